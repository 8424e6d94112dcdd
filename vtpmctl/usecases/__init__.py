"""Use cases on named vTPMs: start, stop, create, snapshot, migrate; never loads libtpms."""
