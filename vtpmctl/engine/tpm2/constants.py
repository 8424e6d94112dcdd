"""TPM 2.0 numbers: tags, handles, algorithms, attributes, command codes.

Values from the TCG TPM 2.0 Library specification, Part 2.
"""

from __future__ import annotations

from enum import IntEnum

ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
HEADER_SIZE = 10

# Startup / Shutdown types.
SU_CLEAR = 0x0000
SU_STATE = 0x0001

# Permanent handles.
RH_OWNER = 0x40000001
RH_NULL = 0x40000007
RS_PW = 0x40000009
RH_LOCKOUT = 0x4000000A
RH_ENDORSEMENT = 0x4000000B
RH_PLATFORM = 0x4000000C

# Handle ranges (the top byte is the handle type).
HR_PCR = 0x00000000
HR_NV_INDEX = 0x01000000
HR_TRANSIENT = 0x80000000
HR_PERSISTENT = 0x81000000


class Alg(IntEnum):
    """TPM_ALG_ID values this module understands."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class Curve(IntEnum):
    """TPM_ECC_CURVE values."""

    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


class ObjAttr:
    """TPMA_OBJECT bits."""

    FIXED_TPM = 0x00000002
    ST_CLEAR = 0x00000004
    FIXED_PARENT = 0x00000010
    SENSITIVE_DATA_ORIGIN = 0x00000020
    USER_WITH_AUTH = 0x00000040
    ADMIN_WITH_POLICY = 0x00000080
    NO_DA = 0x00000400
    ENCRYPTED_DUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000


class NvAttr:
    """TPMA_NV bits."""

    PPWRITE = 0x00000001
    OWNERWRITE = 0x00000002
    AUTHWRITE = 0x00000004
    POLICYWRITE = 0x00000008
    POLICY_DELETE = 0x00000400
    WRITELOCKED = 0x00000800
    WRITEALL = 0x00001000
    WRITEDEFINE = 0x00002000
    WRITE_STCLEAR = 0x00004000
    GLOBALLOCK = 0x00008000
    PPREAD = 0x00010000
    OWNERREAD = 0x00020000
    AUTHREAD = 0x00040000
    POLICYREAD = 0x00080000
    NO_DA = 0x02000000
    ORDERLY = 0x04000000
    CLEAR_STCLEAR = 0x08000000
    READLOCKED = 0x10000000
    WRITTEN = 0x20000000
    PLATFORMCREATE = 0x40000000
    READ_STCLEAR = 0x80000000


class Cap(IntEnum):
    """TPM_CAP values."""

    ALGS = 0x00000000
    HANDLES = 0x00000001
    COMMANDS = 0x00000002
    PCRS = 0x00000005
    TPM_PROPERTIES = 0x00000006


class PT(IntEnum):
    """TPM_PT property tags (fixed group starts at 0x100)."""

    FAMILY_INDICATOR = 0x100
    LEVEL = 0x101
    REVISION = 0x102
    DAY_OF_YEAR = 0x103
    YEAR = 0x104
    MANUFACTURER = 0x105
    VENDOR_STRING_1 = 0x106
    VENDOR_STRING_2 = 0x107
    VENDOR_STRING_3 = 0x108
    VENDOR_STRING_4 = 0x109
    VENDOR_TPM_TYPE = 0x10A
    FIRMWARE_VERSION_1 = 0x10B
    FIRMWARE_VERSION_2 = 0x10C
    INPUT_BUFFER = 0x10D
    HR_TRANSIENT_MIN = 0x10E
    HR_PERSISTENT_MIN = 0x10F
    HR_LOADED_MIN = 0x110
    ACTIVE_SESSIONS_MAX = 0x111
    PCR_COUNT = 0x112
    NV_INDEX_MAX = 0x117
    MAX_COMMAND_SIZE = 0x11E
    MAX_RESPONSE_SIZE = 0x11F
    MAX_DIGEST = 0x120
    NV_BUFFER_MAX = 0x12C
    PERMANENT = 0x200
    STARTUP_CLEAR = 0x201


class CC(IntEnum):
    """TPM_CC values of the commands built or recognised here."""

    NV_UndefineSpace = 0x122
    EvictControl = 0x120
    NV_DefineSpace = 0x12A
    PCR_Allocate = 0x12B
    CreatePrimary = 0x131
    NV_Write = 0x137
    NV_WriteLock = 0x138
    Startup = 0x144
    Shutdown = 0x145
    NV_Read = 0x14E
    Create = 0x153
    FlushContext = 0x165
    NV_ReadPublic = 0x169
    ReadPublic = 0x173
    GetCapability = 0x17A
    GetRandom = 0x17B
    PCR_Read = 0x17E
    CreateLoaded = 0x191


# Commands that generate keys: seconds under emulation, and the ones libtpms can cancel.
KEYGEN_COMMANDS = frozenset({CC.CreatePrimary, CC.Create, CC.CreateLoaded})
