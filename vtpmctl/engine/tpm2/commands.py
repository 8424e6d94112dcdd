"""The commands vtpmctl sends: ``build_x`` → bytes, ``parse_x`` ← bytes, ``x(transact, …)``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vtpmctl.engine.tpm2.constants import CC, PT, RH_OWNER, RH_PLATFORM, SU_CLEAR, Cap
from vtpmctl.engine.tpm2.marshal import (
    PasswordSession,
    Reader,
    Transact,
    build_command,
    execute,
    parse_response,
    tpm2b,
    u16,
    u32,
)
from vtpmctl.engine.tpm2.power import build_shutdown as build_shutdown
from vtpmctl.engine.tpm2.power import build_startup as build_startup
from vtpmctl.engine.tpm2.rc import MalformedResponse
from vtpmctl.engine.tpm2.structures import (
    NvPublic,
    Public,
    marshal_pcr_selection,
    read_pcr_selection,
)


def _pw(auth: bytes) -> list[PasswordSession]:
    return [PasswordSession(auth)]


def startup(transact: Transact, startup_type: int = SU_CLEAR) -> None:
    execute(transact, CC.Startup, params=u16(startup_type))


def shutdown(transact: Transact, shutdown_type: int = SU_CLEAR) -> None:
    execute(transact, CC.Shutdown, params=u16(shutdown_type))


def build_get_random(count: int) -> bytes:
    return build_command(CC.GetRandom, params=u16(count))


def parse_get_random(data: bytes) -> bytes:
    r = parse_response(CC.GetRandom, data).reader()
    out = r.tpm2b()
    r.end()
    return out


def get_random(transact: Transact, count: int) -> bytes:
    """Exactly ``count`` random bytes (the TPM hands out at most a digest per call)."""
    out = b""
    while len(out) < count:
        chunk = parse_get_random(transact(build_get_random(min(count - len(out), 0xFFFF))))
        if not chunk:
            raise MalformedResponse("GetRandom returned no bytes")
        out += chunk
    return out


@dataclass(frozen=True)
class Capability:
    """One GetCapability answer: the raw list plus the decoded items."""

    capability: int
    more_data: bool
    handles: tuple[int, ...] = ()
    properties: tuple[tuple[int, int], ...] = ()
    pcrs: Mapping[int, list[int]] = field(default_factory=dict)
    raw: bytes = b""
    """The capability-specific list, for capabilities not decoded here."""


def build_get_capability(capability: int, prop: int, count: int) -> bytes:
    return build_command(CC.GetCapability, params=u32(capability) + u32(prop) + u32(count))


def parse_get_capability(data: bytes) -> Capability:
    r = parse_response(CC.GetCapability, data).reader()
    more = bool(r.u8())
    cap = r.u32()
    start = r.pos
    if cap == Cap.HANDLES:
        hs = tuple(r.u32() for _ in range(r.u32()))
        return Capability(cap, more, handles=hs, raw=r.data[start:])
    if cap == Cap.TPM_PROPERTIES:
        props = tuple((r.u32(), r.u32()) for _ in range(r.u32()))
        return Capability(cap, more, properties=props, raw=r.data[start:])
    if cap == Cap.PCRS:
        return Capability(cap, more, pcrs=read_pcr_selection(r), raw=r.data[start:])
    return Capability(cap, more, raw=r.rest())


def get_capability(transact: Transact, capability: int, prop: int, count: int) -> Capability:
    return parse_get_capability(transact(build_get_capability(capability, prop, count)))


def get_handles(transact: Transact, first: int) -> list[int]:
    """All handles of one type (the top byte of ``first``) from ``first`` on."""
    out: list[int] = []
    prop = first
    top = first & 0xFF000000
    while True:
        cap = get_capability(transact, Cap.HANDLES, prop, 254)
        hs = [h for h in cap.handles if h & 0xFF000000 == top]
        out.extend(hs)
        if not cap.more_data or not hs or len(hs) != len(cap.handles):
            return out
        prop = hs[-1] + 1


def get_properties(transact: Transact, first: int, count: int = 1) -> dict[int, int]:
    """TPM properties ``first`` … ``first+count-1`` that the TPM reports."""
    out: dict[int, int] = {}
    prop = first
    end = first + count
    while prop < end:
        cap = get_capability(transact, Cap.TPM_PROPERTIES, prop, end - prop)
        got = [(p, v) for p, v in cap.properties if first <= p < end]
        out.update(got)
        if not cap.more_data or not got:
            break
        prop = got[-1][0] + 1
    return out


def get_property(transact: Transact, prop: int) -> int | None:
    return get_properties(transact, prop).get(prop)


def get_pcr_banks(transact: Transact) -> dict[int, list[int]]:
    """{hash alg: active PCRs} as the TPM reports them (empty list = inactive bank)."""
    return dict(get_capability(transact, Cap.PCRS, 0, 1).pcrs)


@dataclass(frozen=True)
class ReadPublicResult:
    public: bytes
    """TPMT_PUBLIC bytes (without the TPM2B size)."""
    name: bytes
    qualified_name: bytes

    @property
    def area(self) -> Public:
        return Public.parse(self.public)


def build_read_public(handle: int) -> bytes:
    return build_command(CC.ReadPublic, [handle])


def parse_read_public(data: bytes) -> ReadPublicResult:
    r = parse_response(CC.ReadPublic, data).reader()
    res = ReadPublicResult(r.tpm2b(), r.tpm2b(), r.tpm2b())
    r.end()
    return res


def read_public(transact: Transact, handle: int) -> ReadPublicResult:
    return parse_read_public(transact(build_read_public(handle)))


@dataclass(frozen=True)
class CreatePrimaryResult:
    handle: int
    public: bytes
    """TPMT_PUBLIC bytes of the new key."""
    name: bytes

    @property
    def area(self) -> Public:
        return Public.parse(self.public)


def build_create_primary(
    hierarchy: int,
    template: Public | bytes,
    *,
    auth: bytes = b"",
    key_auth: bytes = b"",
    sensitive_data: bytes = b"",
    outside_info: bytes = b"",
    creation_pcrs: Mapping[int, Iterable[int]] | None = None,
) -> bytes:
    """``template`` is a Public or already-marshaled TPMT_PUBLIC bytes."""
    tpmt = template.marshal() if isinstance(template, Public) else template
    sensitive = tpm2b(key_auth) + tpm2b(sensitive_data)
    params = (
        tpm2b(sensitive)
        + tpm2b(tpmt)
        + tpm2b(outside_info)
        + marshal_pcr_selection(creation_pcrs or {})
    )
    return build_command(CC.CreatePrimary, [hierarchy], params, _pw(auth))


def parse_create_primary(data: bytes) -> CreatePrimaryResult:
    resp = parse_response(CC.CreatePrimary, data)
    r = resp.reader()
    public = r.tpm2b()
    r.tpm2b()  # creationData
    r.tpm2b()  # creationHash
    r.u16()  # creationTicket.tag
    r.u32()  # creationTicket.hierarchy
    r.tpm2b()  # creationTicket.digest
    name = r.tpm2b()
    r.end()
    return CreatePrimaryResult(resp.handles[0], public, name)


def create_primary(
    transact: Transact,
    hierarchy: int,
    template: Public | bytes,
    *,
    auth: bytes = b"",
    key_auth: bytes = b"",
    sensitive_data: bytes = b"",
    outside_info: bytes = b"",
    creation_pcrs: Mapping[int, Iterable[int]] | None = None,
) -> CreatePrimaryResult:
    cmd = build_create_primary(
        hierarchy,
        template,
        auth=auth,
        key_auth=key_auth,
        sensitive_data=sensitive_data,
        outside_info=outside_info,
        creation_pcrs=creation_pcrs,
    )
    return parse_create_primary(transact(cmd))


def build_evict_control(
    object_handle: int, persistent_handle: int, *, auth_handle: int = RH_OWNER, auth: bytes = b""
) -> bytes:
    return build_command(
        CC.EvictControl, [auth_handle, object_handle], u32(persistent_handle), _pw(auth)
    )


def evict_control(
    transact: Transact,
    object_handle: int,
    persistent_handle: int,
    *,
    auth_handle: int = RH_OWNER,
    auth: bytes = b"",
) -> None:
    """Persist a transient object, or (object == persistent handle) remove a persistent one."""
    execute(
        transact, CC.EvictControl, [auth_handle, object_handle], u32(persistent_handle), _pw(auth)
    )


def build_flush_context(handle: int) -> bytes:
    return build_command(CC.FlushContext, params=u32(handle))


def flush_context(transact: Transact, handle: int) -> None:
    execute(transact, CC.FlushContext, params=u32(handle))


def build_nv_define_space(
    public: NvPublic, *, auth_handle: int = RH_OWNER, auth: bytes = b"", index_auth: bytes = b""
) -> bytes:
    params = tpm2b(index_auth) + tpm2b(public.marshal())
    return build_command(CC.NV_DefineSpace, [auth_handle], params, _pw(auth))


def nv_define_space(
    transact: Transact,
    public: NvPublic,
    *,
    auth_handle: int = RH_OWNER,
    auth: bytes = b"",
    index_auth: bytes = b"",
) -> None:
    cmd = build_nv_define_space(public, auth_handle=auth_handle, auth=auth, index_auth=index_auth)
    parse_response(CC.NV_DefineSpace, transact(cmd))


def build_nv_undefine_space(
    nv_index: int, *, auth_handle: int = RH_OWNER, auth: bytes = b""
) -> bytes:
    return build_command(CC.NV_UndefineSpace, [auth_handle, nv_index], b"", _pw(auth))


def nv_undefine_space(
    transact: Transact, nv_index: int, *, auth_handle: int = RH_OWNER, auth: bytes = b""
) -> None:
    cmd = build_nv_undefine_space(nv_index, auth_handle=auth_handle, auth=auth)
    parse_response(CC.NV_UndefineSpace, transact(cmd))


def build_nv_read_public(nv_index: int) -> bytes:
    return build_command(CC.NV_ReadPublic, [nv_index])


def parse_nv_read_public(data: bytes) -> NvPublic:
    r = parse_response(CC.NV_ReadPublic, data).reader()
    inner = Reader(r.tpm2b())
    index, name_alg, attrs = inner.u32(), inner.u16(), inner.u32()
    policy, size = inner.tpm2b(), inner.u16()
    inner.end()
    name = r.tpm2b()
    r.end()
    return NvPublic(index, name_alg, attrs, policy, size, name)


def nv_read_public(transact: Transact, nv_index: int) -> NvPublic:
    return parse_nv_read_public(transact(build_nv_read_public(nv_index)))


def _nv_handles(nv_index: int, auth_handle: int | None) -> list[int]:
    """An NV command's authHandle (the index itself unless owner/platform) and nvIndex."""
    return [nv_index if auth_handle is None else auth_handle, nv_index]


def build_nv_write(
    nv_index: int,
    data: bytes,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
) -> bytes:
    """One NV_Write; ``data`` must fit the TPM's NV buffer (see nv_write)."""
    return build_command(
        CC.NV_Write, _nv_handles(nv_index, auth_handle), tpm2b(data) + u16(offset), _pw(auth)
    )


def _nv_chunk(transact: Transact, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    # 1024 is libtpms' value and a safe floor for any TPM that hides the property
    return get_property(transact, PT.NV_BUFFER_MAX) or 1024


def nv_write(
    transact: Transact,
    nv_index: int,
    data: bytes,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
    chunk: int | None = None,
) -> None:
    """Write ``data`` in pieces no larger than the TPM's NV buffer."""
    step = _nv_chunk(transact, chunk)
    pos = 0
    while True:
        piece = data[pos : pos + step]
        cmd = build_nv_write(nv_index, piece, offset + pos, auth_handle=auth_handle, auth=auth)
        parse_response(CC.NV_Write, transact(cmd))
        pos += len(piece)
        if pos >= len(data):
            return


def build_nv_read(
    nv_index: int,
    size: int,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
) -> bytes:
    return build_command(
        CC.NV_Read, _nv_handles(nv_index, auth_handle), u16(size) + u16(offset), _pw(auth)
    )


def parse_nv_read(data: bytes) -> bytes:
    r = parse_response(CC.NV_Read, data).reader()
    out = r.tpm2b()
    r.end()
    return out


def nv_read(
    transact: Transact,
    nv_index: int,
    size: int | None = None,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
    chunk: int | None = None,
) -> bytes:
    """Read ``size`` bytes (default: to the end of the index) in NV-buffer pieces."""
    if size is None:
        size = nv_read_public(transact, nv_index).data_size - offset
    step = _nv_chunk(transact, chunk)
    out = b""
    while len(out) < size:
        n = min(step, size - len(out))
        cmd = build_nv_read(nv_index, n, offset + len(out), auth_handle=auth_handle, auth=auth)
        piece = parse_nv_read(transact(cmd))
        if len(piece) != n:
            raise MalformedResponse(f"NV_Read returned {len(piece)} bytes, asked for {n}")
        out += piece
    return out


def build_nv_write_lock(
    nv_index: int, *, auth_handle: int | None = None, auth: bytes = b""
) -> bytes:
    return build_command(CC.NV_WriteLock, _nv_handles(nv_index, auth_handle), b"", _pw(auth))


def nv_write_lock(
    transact: Transact, nv_index: int, *, auth_handle: int | None = None, auth: bytes = b""
) -> None:
    cmd = build_nv_write_lock(nv_index, auth_handle=auth_handle, auth=auth)
    parse_response(CC.NV_WriteLock, transact(cmd))


@dataclass(frozen=True)
class PcrReadResult:
    update_counter: int
    selection: Mapping[int, list[int]]
    digests: tuple[bytes, ...]


def build_pcr_read(selection: Mapping[int, Iterable[int]]) -> bytes:
    return build_command(CC.PCR_Read, params=marshal_pcr_selection(selection))


def parse_pcr_read(data: bytes) -> PcrReadResult:
    r = parse_response(CC.PCR_Read, data).reader()
    counter = r.u32()
    sel = read_pcr_selection(r)
    digests = tuple(r.tpm2b() for _ in range(r.u32()))
    r.end()
    return PcrReadResult(counter, sel, digests)


def pcr_read(
    transact: Transact, selection: Mapping[int, Iterable[int]]
) -> dict[int, dict[int, bytes]]:
    """{hash alg: {pcr: digest}}; loops because the TPM returns at most 8 digests a call.

    PCRs of inactive banks are simply absent from the result.
    """
    pending = {alg: sorted(set(p)) for alg, p in selection.items()}
    out: dict[int, dict[int, bytes]] = {alg: {} for alg in pending}
    while any(pending.values()):
        res = parse_pcr_read(transact(build_pcr_read({a: p for a, p in pending.items() if p})))
        pairs = [(a, p) for a, ps in res.selection.items() for p in ps]
        if not pairs:
            break
        if len(pairs) != len(res.digests):
            raise MalformedResponse("PCR_Read: selection and digest counts differ")
        for (alg, pcr), digest in zip(pairs, res.digests, strict=True):
            out.setdefault(alg, {})[pcr] = digest
            if pcr in pending.get(alg, []):
                pending[alg].remove(pcr)
    return {alg: values for alg, values in out.items() if values}


def build_pcr_allocate(
    selection: Mapping[int, Iterable[int]], *, auth_handle: int = RH_PLATFORM, auth: bytes = b""
) -> bytes:
    return build_command(
        CC.PCR_Allocate, [auth_handle], marshal_pcr_selection(selection), _pw(auth)
    )


def pcr_allocate(
    transact: Transact,
    selection: Mapping[int, Iterable[int]],
    *,
    auth_handle: int = RH_PLATFORM,
    auth: bytes = b"",
) -> bool:
    """Choose the active PCR banks (effective after the next TPM reset); False if refused."""
    r = execute(
        transact, CC.PCR_Allocate, [auth_handle], marshal_pcr_selection(selection), _pw(auth)
    ).reader()
    ok = bool(r.u8())
    r.u32()  # maxPCR
    r.u32()  # sizeNeeded
    r.u32()  # sizeAvailable
    return ok
