"""Raw TPM 2.0 commands, marshalled by hand.

vtpmctl only needs a dozen commands (manufacturing, inspection, health
checks), so a full TSS would be a heavy dependency for little gain. Every
command is a pair of pure functions (``build_x`` → bytes, ``parse_x`` ←
bytes) that unit tests can pin against known bytes, plus a convenience
``x(transact, …)`` that runs them through any ``Transact``: a data socket, a
CUSE device or libtpms in-process.

The package is split by concern: ``constants`` (numbers), ``rc`` (response
codes and errors), ``marshal`` (byte helpers and the command frame),
``structures`` (public areas, schemes, PCR selections) and ``commands``
(with ``power``: Startup and Shutdown, apart for the engine). Callers import
the package; the names in ``__all__`` are its interface.
"""

# Names resolve on first use (PEP 562), each from its own submodule: the engine,
# and so every daemon the zygote forks, imports only ``constants``, ``rc`` and
# ``power``, not the command builders with their dataclasses and hashlib.
# ``typing`` stays unloaded at run time (docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from vtpmctl.engine.tpm2.commands import (
        Capability,
        CreatePrimaryResult,
        PcrReadResult,
        ReadPublicResult,
        build_create_primary,
        build_evict_control,
        build_flush_context,
        build_get_capability,
        build_get_random,
        build_nv_define_space,
        build_nv_read,
        build_nv_read_public,
        build_nv_undefine_space,
        build_nv_write,
        build_nv_write_lock,
        build_pcr_allocate,
        build_pcr_read,
        build_read_public,
        create_primary,
        evict_control,
        flush_context,
        get_capability,
        get_handles,
        get_pcr_banks,
        get_properties,
        get_property,
        get_random,
        nv_define_space,
        nv_read,
        nv_read_public,
        nv_undefine_space,
        nv_write,
        nv_write_lock,
        parse_create_primary,
        parse_get_capability,
        parse_get_random,
        parse_nv_read,
        parse_nv_read_public,
        parse_pcr_read,
        parse_read_public,
        pcr_allocate,
        pcr_read,
        read_public,
        shutdown,
        startup,
    )
    from vtpmctl.engine.tpm2.constants import (
        CC,
        HEADER_SIZE,
        HR_NV_INDEX,
        HR_PCR,
        HR_PERSISTENT,
        HR_TRANSIENT,
        KEYGEN_COMMANDS,
        PT,
        RH_ENDORSEMENT,
        RH_LOCKOUT,
        RH_NULL,
        RH_OWNER,
        RH_PLATFORM,
        RS_PW,
        ST_NO_SESSIONS,
        ST_SESSIONS,
        SU_CLEAR,
        SU_STATE,
        Alg,
        Cap,
        Curve,
        NvAttr,
        ObjAttr,
    )
    from vtpmctl.engine.tpm2.marshal import (
        SHAPES,
        PasswordSession,
        Reader,
        Response,
        Shape,
        Transact,
        build_command,
        execute,
        parse_response,
        tpm2b,
        u8,
        u16,
        u32,
    )
    from vtpmctl.engine.tpm2.power import build_shutdown, build_startup
    from vtpmctl.engine.tpm2.rc import (
        RC,
        MalformedResponse,
        TpmError,
        decode_rc,
        rc_base,
    )
    from vtpmctl.engine.tpm2.structures import (
        NvPublic,
        Public,
        Scheme,
        SymDef,
        hash_name,
        marshal_pcr_selection,
        read_pcr_selection,
    )

# The submodules a name is looked for in, lightest first: a name of ``constants``,
# ``rc`` or ``power`` (all the engine uses) loads none of the others.
_SUBMODULES = ("constants", "rc", "power", "marshal", "structures", "commands")

__all__ = [
    "Alg",
    "CC",
    "KEYGEN_COMMANDS",
    "Cap",
    "Capability",
    "CreatePrimaryResult",
    "Curve",
    "HEADER_SIZE",
    "HR_NV_INDEX",
    "HR_PCR",
    "HR_PERSISTENT",
    "HR_TRANSIENT",
    "MalformedResponse",
    "NvAttr",
    "NvPublic",
    "ObjAttr",
    "PT",
    "PasswordSession",
    "PcrReadResult",
    "Public",
    "RC",
    "RH_ENDORSEMENT",
    "RH_LOCKOUT",
    "RH_NULL",
    "RH_OWNER",
    "RH_PLATFORM",
    "RS_PW",
    "ReadPublicResult",
    "Reader",
    "Response",
    "SHAPES",
    "ST_NO_SESSIONS",
    "ST_SESSIONS",
    "SU_CLEAR",
    "SU_STATE",
    "Scheme",
    "Shape",
    "SymDef",
    "TpmError",
    "Transact",
    "build_command",
    "build_create_primary",
    "build_evict_control",
    "build_flush_context",
    "build_get_capability",
    "build_get_random",
    "build_nv_define_space",
    "build_nv_read",
    "build_nv_read_public",
    "build_nv_undefine_space",
    "build_nv_write",
    "build_nv_write_lock",
    "build_pcr_allocate",
    "build_pcr_read",
    "build_read_public",
    "build_shutdown",
    "build_startup",
    "create_primary",
    "decode_rc",
    "evict_control",
    "execute",
    "flush_context",
    "get_capability",
    "get_handles",
    "get_pcr_banks",
    "get_properties",
    "get_property",
    "get_random",
    "hash_name",
    "marshal_pcr_selection",
    "nv_define_space",
    "nv_read",
    "nv_read_public",
    "nv_undefine_space",
    "nv_write",
    "nv_write_lock",
    "parse_create_primary",
    "parse_get_capability",
    "parse_get_random",
    "parse_nv_read",
    "parse_nv_read_public",
    "parse_pcr_read",
    "parse_read_public",
    "parse_response",
    "pcr_allocate",
    "pcr_read",
    "rc_base",
    "read_pcr_selection",
    "read_public",
    "shutdown",
    "startup",
    "tpm2b",
    "u16",
    "u32",
    "u8",
]

if not TYPE_CHECKING:  # mypy sees the imports above, and no catch-all __getattr__

    def __getattr__(name: str) -> object:
        if name in __all__:
            for module in _SUBMODULES:
                found = __import__(f"{__name__}.{module}", fromlist=[name])
                if hasattr(found, name):
                    value = getattr(found, name)
                    globals()[name] = value  # the next lookup is a plain attribute
                    return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
