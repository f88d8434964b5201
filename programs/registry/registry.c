/* The voice-network node registry: a Solana program in C with Anchor's ABI.
 *
 * Instruction data = sha256("global:<snake_name>")[:8] + Borsh arguments; account data =
 * sha256("account:<Name>")[:8] + fixed-layout fields (see idl.json and README.md). The
 * discriminators and error codes come from discriminators.h, generated from idl.json by
 * build.py. Errors are returned as Custom(code) after logging "error: <Name>".
 *
 * Every instruction checks: exact account count and instruction length, signer and writable
 * flags, the System Program id, the owner and discriminator (and size) of every account it
 * reads, the PDA of every program account (recomputed with its stored bump; canonical bump via
 * sol_try_find_program_address at creation), checked arithmetic, and closes accounts by
 * draining lamports, zeroing and truncating the data and handing them back to the System
 * Program.
 */
#include "sol.h"
#include "discriminators.h"

#define MAX_ACCOUNTS 8
#define ACCOUNT_STORAGE_OVERHEAD 128
#define MAX_TTL_SECONDS 86400
#define MAX_URL_LEN 200
#define VERSION_LEN 16
#define MAX_LAT 90000000
#define MAX_LON 180000000

/* Registry PDA ["registry"] */
#define REGISTRY_SIZE 72
#define REG_AUTHORITY 8
#define REG_TTL 40
#define REG_NODE_COUNT 48
#define REG_ISSUER_COUNT 56
#define REG_BUMP 64
#define REG_POLICY 65

#define POLICY_APPROVAL 0
#define POLICY_OPEN 1

/* Issuer PDA ["issuer", key]: a trusted gateway key and its public URL, where nodes send the
 * usage of the sessions it issued and their load reports. */
#define ISSUER_SIZE 260
#define ISS_KEY 8
#define ISS_ADDED_AT 40
#define ISS_BUMP 48
#define ISS_URL_LEN 56
#define ISS_URL 60

/* Node PDA ["node", owner] */
#define NODE_SIZE 308
#define NODE_OWNER 8
#define NODE_REGISTERED_AT 40
#define NODE_LAST_HEARTBEAT 48
#define NODE_LAST_HEARTBEAT_SLOT 56
#define NODE_LAT 64
#define NODE_LON 68
#define NODE_CAPACITY 72
#define NODE_LOAD 76
#define NODE_ROLE 80
#define NODE_STATUS 81
#define NODE_BUMP 82
#define NODE_COUNTRY 84
#define NODE_VERSION 88
#define NODE_URL_LEN 104
#define NODE_URL 108

#define ROLE_MAX 2
#define STATUS_ACTIVE 0
#define STATUS_SUSPENDED 1
#define STATUS_PENDING 2

/* BPF upgradeable loader (loader v3): the program account is [u32 tag 2, ProgramData address];
 * its ProgramData account, the PDA [program id] of the loader, is [u32 tag 3, u64 slot,
 * Option<Pubkey> upgrade authority] followed by the ELF. */
#define LOADER_PROGRAM_TAG 2
#define LOADER_PROGRAMDATA_TAG 3
#define PROGRAM_ACCOUNT_LEN 36
#define PROGRAMDATA_AUTHORITY_TAG 12
#define PROGRAMDATA_AUTHORITY 13
#define PROGRAMDATA_METADATA_LEN 45

/* System Program instruction indices */
#define SYS_CREATE_ACCOUNT 0
#define SYS_ASSIGN 1
#define SYS_TRANSFER 2
#define SYS_ALLOCATE 8

#define FIELD(type, data, off) (*(type *)((data) + (off)))

typedef struct {
    u8 *acc[MAX_ACCOUNTS];
    u64 num_accounts;
    const u8 *data;
    u64 data_len;
    Key program_id;
} Ctx;

static __attribute__((noinline)) u64 fail(u64 code, const char *msg, u64 len) {
    sol_log_(msg, len);
    return code;
}

#define FAIL(name) return fail(E_##name, "error: " #name, sizeof("error: " #name) - 1)
#define TRY(expr)                                                                            \
    do {                                                                                     \
        u64 rc_ = (expr);                                                                    \
        if (rc_) return rc_;                                                                 \
    } while (0)

static const char SEED_REGISTRY[] = "registry";
static const char SEED_ISSUER[] = "issuer";
static const char SEED_NODE[] = "node";
/* BPFLoaderUpgradeab1e11111111111111111111111, as four little-endian words. */
static const Key LOADER_V3 = {{0xb0a1884e91f6a802ULL, 0x2bae63f73e1510e2ULL,
                               0xd224c1163db9c200ULL, 0x00008004107a53c0ULL}};

/* ---------------------------------------------------------------- account checks */

static u64 need_signer(const u8 *rec) {
    if (!ACC_IS_SIGNER(rec)) FAIL(MissingSignature);
    return 0;
}

static u64 need_writable(const u8 *rec) {
    if (!ACC_IS_WRITABLE(rec)) FAIL(NotWritable);
    return 0;
}

static u64 need_system_program(const u8 *rec) {
    if (!key_is_zero(ACC_KEY(rec))) FAIL(WrongSystemProgram);
    return 0;
}

/* A program account of the given type: owned by this program, exact size, right
 * discriminator. A missing account (system-owned, no data) is NotInitialized. */
static u64 load_account(const Ctx *c, const u8 *rec, u64 disc, u64 size) {
    u64 len = *ACC_DATA_LEN(rec);
    if (!key_eq(ACC_OWNER(rec), &c->program_id)) {
        if (len == 0 && key_is_zero(ACC_OWNER(rec))) FAIL(NotInitialized);
        FAIL(WrongAccountOwner);
    }
    if (len < 8 || FIELD(u64, ACC_DATA(rec), 0) == 0) FAIL(NotInitialized);
    if (FIELD(u64, ACC_DATA(rec), 0) != disc || len != size) FAIL(WrongDiscriminator);
    return 0;
}

/* An account about to be created must not exist yet: still owned by the System Program and
 * without data (it may hold lamports: someone can always send some to an address). */
static u64 need_absent(const u8 *rec) {
    if (!key_is_zero(ACC_OWNER(rec)) || *ACC_DATA_LEN(rec) != 0) FAIL(AlreadyInitialized);
    return 0;
}

static void seeds2(SolSeed *s, const char *prefix, u64 prefix_len, const Key *key) {
    s[0].addr = (const u8 *)prefix;
    s[0].len = prefix_len;
    s[1].addr = (const u8 *)key;
    s[1].len = 32;
}

/* The account's address must be create_program_address(seeds): the stored bump is the last
 * seed, so one hash instead of a search. */
static u64 check_pda(const Ctx *c, const u8 *rec, const SolSeed *seeds, u64 n) {
    Key addr;
    if (sol_create_program_address(seeds, n, &c->program_id, &addr) != 0 ||
        !key_eq(&addr, ACC_KEY(rec)))
        FAIL(InvalidPda);
    return 0;
}

/* The canonical PDA of seeds must be the account; returns the canonical bump. */
static u64 find_pda(const Ctx *c, const u8 *rec, const SolSeed *seeds, u64 n, u8 *bump) {
    Key addr;
    if (sol_try_find_program_address(seeds, n, &c->program_id, &addr, bump) != 0 ||
        !key_eq(&addr, ACC_KEY(rec)))
        FAIL(InvalidPda);
    return 0;
}

/* The Registry account (owner, discriminator, PDA with its stored bump). */
static u64 load_registry(const Ctx *c, const u8 *reg) {
    TRY(load_account(c, reg, DISC_REGISTRY, REGISTRY_SIZE));
    SolSeed s[2] = {{(const u8 *)SEED_REGISTRY, sizeof(SEED_REGISTRY) - 1},
                    {ACC_DATA(reg) + REG_BUMP, 1}};
    return check_pda(c, reg, s, 2);
}

/* An Issuer account at the PDA of the key it holds. */
static u64 load_issuer(const Ctx *c, const u8 *iss) {
    TRY(load_account(c, iss, DISC_ISSUER, ISSUER_SIZE));
    SolSeed s[3];
    seeds2(s, SEED_ISSUER, sizeof(SEED_ISSUER) - 1, (const Key *)(ACC_DATA(iss) + ISS_KEY));
    s[2].addr = ACC_DATA(iss) + ISS_BUMP;
    s[2].len = 1;
    return check_pda(c, iss, s, 3);
}

/* A Node account whose PDA is derived from `owner` (the signer's key, or the stored one). */
static u64 load_node(const Ctx *c, const u8 *node, const Key *owner) {
    TRY(load_account(c, node, DISC_NODE, NODE_SIZE));
    SolSeed s[3];
    seeds2(s, SEED_NODE, sizeof(SEED_NODE) - 1, owner);
    s[2].addr = ACC_DATA(node) + NODE_BUMP;
    s[2].len = 1;
    return check_pda(c, node, s, 3);
}

/* A Node account driven by its owner's signature: PDA from the signer, stored owner = signer. */
static u64 load_own_node(const Ctx *c, const u8 *node, const u8 *owner) {
    TRY(load_node(c, node, ACC_KEY(owner)));
    if (!key_eq((const Key *)(ACC_DATA(node) + NODE_OWNER), ACC_KEY(owner))) FAIL(NotNodeOwner);
    return 0;
}

static u64 need_authority(const u8 *reg, const u8 *signer) {
    if (!key_eq((const Key *)(ACC_DATA(reg) + REG_AUTHORITY), ACC_KEY(signer)))
        FAIL(NotAuthority);
    return 0;
}

/* A Pubkey at an unaligned offset of account data. */
static void read_key(Key *out, const u8 *p) {
    for (int i = 0; i < 4; i++) out->w[i] = rd_u64(p + 8 * i);
}

/* The program account `prog` must be this program under the upgradeable loader and name
 * `pdata` as its ProgramData, which must also be the loader's PDA [program id]. */
static u64 need_program_data(const Ctx *c, const u8 *prog, const u8 *pdata) {
    if (!key_eq(ACC_KEY(prog), &c->program_id) || !key_eq(ACC_OWNER(prog), &LOADER_V3) ||
        *ACC_DATA_LEN(prog) != PROGRAM_ACCOUNT_LEN ||
        rd_u32(ACC_DATA(prog)) != LOADER_PROGRAM_TAG)
        FAIL(InvalidProgramData);
    Key named, derived;
    read_key(&named, ACC_DATA(prog) + 4);
    u8 bump;
    SolSeed s[1] = {{(const u8 *)&c->program_id, 32}};
    if (!key_eq(&named, ACC_KEY(pdata)) ||
        sol_try_find_program_address(s, 1, &LOADER_V3, &derived, &bump) != 0 ||
        !key_eq(&derived, ACC_KEY(pdata)))
        FAIL(InvalidProgramData);
    if (!key_eq(ACC_OWNER(pdata), &LOADER_V3) || *ACC_DATA_LEN(pdata) < PROGRAMDATA_METADATA_LEN ||
        rd_u32(ACC_DATA(pdata)) != LOADER_PROGRAMDATA_TAG)
        FAIL(InvalidProgramData);
    return 0;
}

/* Only whoever may replace the program may create its registry: the signer must be the upgrade
 * authority stored in ProgramData (an immutable program, without one, has no such key). This
 * closes the race where the first caller after a deploy would own the registry. */
static u64 need_upgrade_authority(const Ctx *c, const u8 *prog, const u8 *pdata,
                                  const u8 *signer) {
    TRY(need_program_data(c, prog, pdata));
    const u8 *d = ACC_DATA(pdata);
    if (d[PROGRAMDATA_AUTHORITY_TAG] != 1) FAIL(NotUpgradeAuthority);
    Key authority;
    read_key(&authority, d + PROGRAMDATA_AUTHORITY);
    if (!key_eq(&authority, ACC_KEY(signer))) FAIL(NotUpgradeAuthority);
    return 0;
}

/* Heartbeats and updates only from admitted, unsuspended nodes: a pending node must not steer
 * its entry (nor look alive) before the authority has approved it. */
static u64 need_active(const u8 *node) {
    u8 status = ACC_DATA(node)[NODE_STATUS];
    if (status == STATUS_PENDING) FAIL(NodePending);
    if (status != STATUS_ACTIVE) FAIL(NodeSuspended);
    return 0;
}

/* ---------------------------------------------------------------- rent and creation */

/* U64_MAX / b, hidden from the optimiser: `a > U64_MAX / b` would otherwise become a 128-bit
 * multiply-with-overflow, a libcall BPF does not have. */
static inline u64 max_factor(u64 b) {
    u64 q = U64_MAX / b;
    __asm__("" : "+r"(q));
    return q;
}

/* Rent::minimum_balance without floating point: ((128 + space) * lamports_per_byte_year)
 * * exemption_threshold, the f64 threshold decoded as m * 2^e. Exact (the same lamports as the
 * runtime's f64 arithmetic) for the dyadic thresholds clusters use (2.0, 1.0); for any other
 * threshold the mantissa is rounded up and so is the result: at most a few lamports more than
 * the minimum, never less. */
static u64 rent_exempt_minimum(u64 space, u64 *out) {
    SolRent rent;
    sol_get_rent_sysvar(&rent);
    u64 bytes = ACCOUNT_STORAGE_OVERHEAD + space;
    u64 lpby = rent.lamports_per_byte_year;
    if (lpby != 0 && bytes > max_factor(lpby)) FAIL(Overflow);
    u64 base = bytes * lpby;
    u64 bits = rent.exemption_threshold_bits;
    u64 exp = (bits >> 52) & 0x7ff;
    u64 frac = bits & ((1ULL << 52) - 1);
    if (bits >> 63 || exp == 0x7ff) FAIL(Overflow);
    if (exp == 0 || base == 0) { /* zero or subnormal threshold: nothing to pay */
        *out = 0;
        return 0;
    }
    u64 m = frac | (1ULL << 52);
    i64 e = (i64)exp - 1075;
    while ((m & 1) == 0) {
        m >>= 1;
        e += 1;
    }
    int inexact = 0;
    while (m != 1 && base > max_factor(m)) {
        m = (m >> 1) + (m & 1); /* ceil(m / 2) */
        e += 1;
        inexact = 1;
    }
    u64 v = base * m;
    if (e >= 0) {
        if (e >= 64 || v > (U64_MAX >> e)) FAIL(Overflow);
        v <<= e;
    } else {
        u64 shift = (u64)(-e);
        u64 kept = shift >= 64 ? 0 : v >> shift;
        if (inexact && (shift >= 64 || (kept << shift) != v)) kept += 1;
        v = kept;
    }
    *out = v;
    return 0;
}

typedef struct {
    u8 *payer;
    u8 *target;
    u8 *system;
    const SolSeed *seeds; /* the target's PDA seeds, bump included */
    u64 nseeds;
    u64 space;
    const Key *owner;
} Create;

static void account_info(SolAccountMeta *meta, SolAccountInfo *info, u8 *rec) {
    meta->pubkey = ACC_KEY(rec);
    meta->is_writable = 1;
    meta->is_signer = 1;
    info->key = ACC_KEY(rec);
    info->lamports = ACC_LAMPORTS(rec);
    info->data_len = *ACC_DATA_LEN(rec);
    info->data = ACC_DATA(rec);
    info->owner = ACC_OWNER(rec);
    info->rent_epoch = 0;
    info->is_signer = ACC_IS_SIGNER(rec);
    info->is_writable = ACC_IS_WRITABLE(rec);
    info->executable = ACC_EXECUTABLE(rec);
}

/* One System Program instruction over [payer?, target], the target signing with its seeds. */
static u64 system_invoke(const Create *cr, u8 *data, u64 data_len, int with_payer) {
    SolAccountMeta metas[2];
    SolAccountInfo infos[2];
    u64 n = 0;
    if (with_payer) {
        account_info(&metas[0], &infos[0], cr->payer);
        n = 1;
    }
    account_info(&metas[n], &infos[n], cr->target);
    n += 1;
    SolInstruction ix = {ACC_KEY(cr->system), metas, n, data, data_len};
    SolSignerSeeds signer = {cr->seeds, cr->nseeds};
    return sol_invoke_signed_c(&ix, infos, n, &signer, 1);
}

/* Create the PDA `target`, rent-exempt, `space` bytes, owned by this program. If someone
 * already sent lamports to the address, CreateAccount would fail, so top it up, allocate and
 * assign instead. */
static u64 create_pda(const Create *cr) {
    u64 need;
    TRY(rent_exempt_minimum(cr->space, &need));
    u64 have = *ACC_LAMPORTS(cr->target);
    u8 buf[52];
    if (have == 0) {
        wr_u32(buf, SYS_CREATE_ACCOUNT);
        wr_u64(buf + 4, need);
        wr_u64(buf + 12, cr->space);
        __builtin_memcpy(buf + 20, cr->owner, 32);
        return system_invoke(cr, buf, 52, 1);
    }
    if (have < need) {
        wr_u32(buf, SYS_TRANSFER);
        wr_u64(buf + 4, need - have);
        TRY(system_invoke(cr, buf, 12, 1));
    }
    wr_u32(buf, SYS_ALLOCATE);
    wr_u64(buf + 4, cr->space);
    TRY(system_invoke(cr, buf, 12, 0));
    wr_u32(buf, SYS_ASSIGN);
    __builtin_memcpy(buf + 4, cr->owner, 32);
    return system_invoke(cr, buf, 36, 0);
}

/* Close a program account: lamports to `dest`, data zeroed and truncated, owner back to the
 * System Program, so it cannot be read or revived later in the same transaction. */
static u64 close_account(u8 *rec, u8 *dest) {
    u64 amount = *ACC_LAMPORTS(rec);
    u64 *to = ACC_LAMPORTS(dest);
    if (*to + amount < *to) FAIL(Overflow);
    *to += amount;
    *ACC_LAMPORTS(rec) = 0;
    sol_memset_(ACC_DATA(rec), 0, *ACC_DATA_LEN(rec));
    *ACC_DATA_LEN(rec) = 0;
    Key *owner = ACC_OWNER(rec);
    owner->w[0] = owner->w[1] = owner->w[2] = owner->w[3] = 0;
    return 0;
}

/* A member of the registry (a node or an issuer): an account at the canonical PDA of
 * (prefix, key), counted in the registry's counter at `count_at`. The count moves with the
 * accounts: +1 when one is created, -1 when one is closed. */
typedef struct {
    u8 *registry;
    u64 count_at;
    u8 *payer;
    u8 *target;
    u8 *system;
    const char *prefix;
    u64 prefix_len;
    const Key *key;
} Member;

/* The checks of every instruction that adds or removes a member: the signer pays or takes the
 * rent (so it is writable), the registry's count and the member's account change (writable),
 * and the registry is this program's. */
static u64 load_member_accounts(const Ctx *c, const u8 *reg, const u8 *member, const u8 *signer) {
    TRY(need_signer(signer));
    TRY(need_writable(signer));
    TRY(need_writable(reg));
    TRY(need_writable(member));
    return load_registry(c, reg);
}

/* Create the member's account, rent-exempt with `space` bytes, paid by the payer: it must not
 * exist yet. Returns its bump. */
static u64 add_member(const Ctx *c, const Member *m, u64 space, u8 *bump) {
    SolSeed s[3];
    seeds2(s, m->prefix, m->prefix_len, m->key);
    s[2].addr = bump;
    s[2].len = 1;
    TRY(find_pda(c, m->target, s, 2, bump));
    TRY(need_absent(m->target));
    u64 *count = &FIELD(u64, ACC_DATA(m->registry), m->count_at);
    if (*count == U64_MAX) FAIL(Overflow);
    Create cr = {m->payer, m->target, m->system, s, 3, space, &c->program_id};
    TRY(create_pda(&cr));
    *count += 1;
    return 0;
}

/* Close a member's account (its rent to `dest`) and count it out. */
static u64 remove_member(u8 *registry, u64 count_at, u8 *target, u8 *dest) {
    u64 *count = &FIELD(u64, ACC_DATA(registry), count_at);
    if (*count == 0) FAIL(Overflow);
    TRY(close_account(target, dest));
    *count -= 1;
    return 0;
}

/* ---------------------------------------------------------------- node fields */

static int printable(u8 ch) { return ch >= 0x21 && ch <= 0x7e; }

static u8 lower(u8 ch) { return (ch >= 'A' && ch <= 'Z') ? (u8)(ch + 32) : ch; }

/* The offset just past "<scheme>://" when url starts with it (scheme case-insensitive, as URL
 * parsers read it), else 0. */
static u64 scheme_end(const u8 *url, u64 len, const char *scheme, u64 slen) {
    if (len < slen + 3) return 0;
    for (u64 i = 0; i < slen; i++)
        if (lower(url[i]) != (u8)scheme[i]) return 0;
    if (url[slen] != ':' || url[slen + 1] != '/' || url[slen + 2] != '/') return 0;
    return slen + 3;
}

/* One decimal octet (0..255, no leading zero) of a dotted quad; its length, or 0. */
static u64 octet(const u8 *p, u64 n, u64 *value) {
    u64 i = 0, v = 0;
    while (i < n && i < 4 && p[i] >= '0' && p[i] <= '9') v = v * 10 + (p[i++] - '0');
    if (i == 0 || i > 3 || v > 255 || (i > 1 && p[0] == '0')) return 0;
    *value = v;
    return i;
}

/* localhost, [::1] or 127.x.x.x: the hosts registry/nodeurl.py calls loopback. */
static int loopback_host(const u8 *h, u64 n) {
    static const char LOCALHOST[] = "localhost";
    static const char V6[] = "[::1]";
    if (n == 9) {
        int same = 1;
        for (u64 i = 0; i < 9; i++) same &= lower(h[i]) == (u8)LOCALHOST[i];
        if (same) return 1;
    }
    if (n == 5) {
        int same = 1;
        for (u64 i = 0; i < 5; i++) same &= h[i] == (u8)V6[i];
        if (same) return 1;
    }
    u64 at = 0, v = 0, first = 0;
    for (int k = 0; k < 4; k++) {
        if (k > 0) {
            if (at >= n || h[at] != '.') return 0;
            at += 1;
        }
        u64 used = octet(h + at, n - at, &v);
        if (used == 0) return 0;
        if (k == 0) first = v;
        at += used;
    }
    return at == n && first == 127;
}

/* Tokens travel to a node's URL, so only TLS: https:// or wss:// with a host and a numeric port
 * (if any); plain http:// or ws:// only to a loopback host. The host is what follows the last
 * '@' of the authority, as URL parsers read it. The same rule as registry/nodeurl.py. */
static u64 check_url_scheme(const u8 *url, u64 len) {
    int plain = 0;
    u64 start = scheme_end(url, len, "https", 5);
    if (!start) start = scheme_end(url, len, "wss", 3);
    if (!start) {
        plain = 1;
        start = scheme_end(url, len, "http", 4);
        if (!start) start = scheme_end(url, len, "ws", 2);
    }
    if (!start) FAIL(InsecureUrl);
    u64 end = start;
    while (end < len && url[end] != '/' && url[end] != '?' && url[end] != '#') end++;
    u64 host = start;
    for (u64 i = start; i < end; i++)
        if (url[i] == '@') host = i + 1;
    u64 host_end = host;
    if (host < end && url[host] == '[') {
        while (host_end < end && url[host_end] != ']') host_end++;
        if (host_end == end) FAIL(InsecureUrl);
        host_end += 1;
    } else {
        while (host_end < end && url[host_end] != ':') host_end++;
    }
    if (host_end == host) FAIL(InsecureUrl);
    if (host_end < end) {
        if (url[host_end] != ':' || end - host_end > 6) FAIL(InsecureUrl);
        u64 port = 0;
        for (u64 i = host_end + 1; i < end; i++) {
            if (url[i] < '0' || url[i] > '9') FAIL(InsecureUrl);
            port = port * 10 + (url[i] - '0');
        }
        if (port > 65535) FAIL(InsecureUrl);
    }
    if (plain && !loopback_host(url + host, host_end - host)) FAIL(InsecureUrl);
    return 0;
}

/* url[len], then lat i32, lon i32, country [u8;2], capacity u32, version [u8;16]. */
#define FIELDS_TAIL 30

/* A node's or a gateway's URL: 1..200 printable bytes, TLS or loopback (check_url_scheme). */
static u64 validate_url(const u8 *url, u64 len) {
    if (len < 1 || len > MAX_URL_LEN) FAIL(InvalidUrl);
    for (u64 i = 0; i < len; i++)
        if (!printable(url[i])) FAIL(InvalidUrl);
    return check_url_scheme(url, len);
}

static void write_url(u8 *d, u64 len_at, u64 url_at, const u8 *url, u64 len) {
    FIELD(u32, d, len_at) = (u32)len;
    sol_memcpy_(d + url_at, url, len);
    sol_memset_(d + url_at + len, 0, MAX_URL_LEN - len);
}

static u64 validate_fields(const u8 *url, u64 len) {
    TRY(validate_url(url, len));
    const u8 *q = url + len;
    i64 lat = (i32)rd_u32(q);
    if (lat < -MAX_LAT || lat > MAX_LAT) FAIL(InvalidLatitude);
    i64 lon = (i32)rd_u32(q + 4);
    if (lon < -MAX_LON || lon > MAX_LON) FAIL(InvalidLongitude);
    if (q[8] < 'A' || q[8] > 'Z' || q[9] < 'A' || q[9] > 'Z') FAIL(InvalidCountry);
    if (rd_u32(q + 10) == 0) FAIL(InvalidCapacity);
    const u8 *v = q + 14;
    if (v[0] == 0) FAIL(InvalidVersion);
    int ended = 0;
    for (u64 i = 0; i < VERSION_LEN; i++) {
        if (ended) {
            if (v[i] != 0) FAIL(InvalidVersion);
        } else if (v[i] == 0) {
            ended = 1;
        } else if (!printable(v[i])) {
            FAIL(InvalidVersion);
        }
    }
    return 0;
}

static void write_fields(u8 *d, const u8 *url, u64 len) {
    const u8 *q = url + len;
    FIELD(u32, d, NODE_LAT) = rd_u32(q);
    FIELD(u32, d, NODE_LON) = rd_u32(q + 4);
    d[NODE_COUNTRY] = q[8];
    d[NODE_COUNTRY + 1] = q[9];
    FIELD(u32, d, NODE_CAPACITY) = rd_u32(q + 10);
    sol_memcpy_(d + NODE_VERSION, q + 14, VERSION_LEN);
    write_url(d, NODE_URL_LEN, NODE_URL, url, len);
}

/* ---------------------------------------------------------------- instructions */

/* initialize_registry(heartbeat_ttl: i64, policy: u8): [registry w, authority s w,
 * system_program, program, program_data]. The signer must be the program's upgrade authority. */
static u64 initialize_registry(const Ctx *c) {
    if (c->num_accounts != 5 || c->data_len != 17) FAIL(InvalidInstruction);
    u8 *reg = c->acc[0], *auth = c->acc[1], *sys = c->acc[2];
    TRY(need_signer(auth));
    TRY(need_writable(auth));
    TRY(need_writable(reg));
    TRY(need_system_program(sys));
    TRY(need_upgrade_authority(c, c->acc[3], c->acc[4], auth));
    i64 ttl = (i64)rd_u64(c->data + 8);
    if (ttl < 1 || ttl > MAX_TTL_SECONDS) FAIL(InvalidTtl);
    u8 policy = c->data[16];
    if (policy > POLICY_OPEN) FAIL(InvalidPolicy);
    u8 bump;
    SolSeed s[2] = {{(const u8 *)SEED_REGISTRY, sizeof(SEED_REGISTRY) - 1}, {&bump, 1}};
    TRY(find_pda(c, reg, s, 1, &bump));
    TRY(need_absent(reg));
    Create cr = {auth, reg, sys, s, 2, REGISTRY_SIZE, &c->program_id};
    TRY(create_pda(&cr));
    u8 *d = ACC_DATA(reg);
    FIELD(u64, d, 0) = DISC_REGISTRY;
    FIELD(Key, d, REG_AUTHORITY) = *ACC_KEY(auth);
    FIELD(i64, d, REG_TTL) = ttl;
    FIELD(u64, d, REG_NODE_COUNT) = 0;
    FIELD(u64, d, REG_ISSUER_COUNT) = 0;
    d[REG_BUMP] = bump;
    d[REG_POLICY] = policy;
    return 0;
}

/* add_issuer(key: Pubkey, url: string): [registry w, issuer w, authority s w, system_program] */
static u64 add_issuer(const Ctx *c) {
    if (c->num_accounts != 4 || c->data_len < 44) FAIL(InvalidInstruction);
    u64 url_len = rd_u32(c->data + 40);
    if (c->data_len != 44 + url_len) FAIL(InvalidInstruction);
    TRY(validate_url(c->data + 44, url_len));
    u8 *reg = c->acc[0], *iss = c->acc[1], *auth = c->acc[2], *sys = c->acc[3];
    TRY(load_member_accounts(c, reg, iss, auth));
    TRY(need_system_program(sys));
    TRY(need_authority(reg, auth));
    Key key;
    for (int i = 0; i < 4; i++) key.w[i] = rd_u64(c->data + 8 + 8 * i);
    u8 bump;
    Member m = {reg, REG_ISSUER_COUNT, auth, iss, sys, SEED_ISSUER, sizeof(SEED_ISSUER) - 1, &key};
    TRY(add_member(c, &m, ISSUER_SIZE, &bump));
    SolClock clock;
    sol_get_clock_sysvar(&clock);
    u8 *d = ACC_DATA(iss);
    FIELD(u64, d, 0) = DISC_ISSUER;
    FIELD(Key, d, ISS_KEY) = key;
    FIELD(i64, d, ISS_ADDED_AT) = clock.unix_timestamp;
    d[ISS_BUMP] = bump;
    write_url(d, ISS_URL_LEN, ISS_URL, c->data + 44, url_len);
    return 0;
}

/* remove_issuer(): [registry w, issuer w, authority s w] */
static u64 remove_issuer(const Ctx *c) {
    if (c->num_accounts != 3 || c->data_len != 8) FAIL(InvalidInstruction);
    u8 *reg = c->acc[0], *iss = c->acc[1], *auth = c->acc[2];
    TRY(load_member_accounts(c, reg, iss, auth));
    TRY(need_authority(reg, auth));
    TRY(load_issuer(c, iss));
    return remove_member(reg, REG_ISSUER_COUNT, iss, auth);
}

/* update_issuer(url: string): [registry, issuer w, authority s]. A gateway that moves keeps its
 * key (and every token it issued stays valid). */
static u64 update_issuer(const Ctx *c) {
    if (c->num_accounts != 3 || c->data_len < 12) FAIL(InvalidInstruction);
    u64 url_len = rd_u32(c->data + 8);
    if (c->data_len != 12 + url_len) FAIL(InvalidInstruction);
    u8 *reg = c->acc[0], *iss = c->acc[1], *auth = c->acc[2];
    TRY(need_signer(auth));
    TRY(need_writable(iss));
    TRY(load_registry(c, reg));
    TRY(need_authority(reg, auth));
    TRY(load_issuer(c, iss));
    TRY(validate_url(c->data + 12, url_len));
    write_url(ACC_DATA(iss), ISS_URL_LEN, ISS_URL, c->data + 12, url_len);
    return 0;
}

/* register_node(role u8, url string, lat i32, lon i32, country [u8;2], capacity u32,
 * version [u8;16]): [registry w, node w, owner s w, system_program] */
static u64 register_node(const Ctx *c) {
    if (c->num_accounts != 4 || c->data_len < 13) FAIL(InvalidInstruction);
    u64 url_len = rd_u32(c->data + 9);
    if (c->data_len != 13 + url_len + FIELDS_TAIL) FAIL(InvalidInstruction);
    u8 *reg = c->acc[0], *node = c->acc[1], *owner = c->acc[2], *sys = c->acc[3];
    TRY(load_member_accounts(c, reg, node, owner));
    TRY(need_system_program(sys));
    u8 role = c->data[8];
    if (role > ROLE_MAX) FAIL(InvalidRole);
    const u8 *url = c->data + 13;
    TRY(validate_fields(url, url_len));
    u8 bump;
    Member m = {reg, REG_NODE_COUNT, owner, node, sys, SEED_NODE, sizeof(SEED_NODE) - 1,
                ACC_KEY(owner)};
    TRY(add_member(c, &m, NODE_SIZE, &bump));
    SolClock clock;
    sol_get_clock_sysvar(&clock);
    u8 *d = ACC_DATA(node);
    FIELD(u64, d, 0) = DISC_NODE;
    FIELD(Key, d, NODE_OWNER) = *ACC_KEY(owner);
    FIELD(i64, d, NODE_REGISTERED_AT) = clock.unix_timestamp;
    FIELD(i64, d, NODE_LAST_HEARTBEAT) = clock.unix_timestamp;
    FIELD(u64, d, NODE_LAST_HEARTBEAT_SLOT) = clock.slot;
    FIELD(u32, d, NODE_LOAD) = 0;
    d[NODE_ROLE] = role;
    d[NODE_STATUS] = ACC_DATA(reg)[REG_POLICY] == POLICY_OPEN ? STATUS_ACTIVE : STATUS_PENDING;
    d[NODE_BUMP] = bump;
    write_fields(d, url, url_len);
    return 0;
}

/* heartbeat(load u32, capacity u32): [node w, owner s]. Only an active node; load <= capacity
 * (a node advertising more room than it has would attract every session). */
static u64 heartbeat(const Ctx *c) {
    if (c->num_accounts != 2 || c->data_len != 16) FAIL(InvalidInstruction);
    u8 *node = c->acc[0], *owner = c->acc[1];
    TRY(need_signer(owner));
    TRY(need_writable(node));
    TRY(load_own_node(c, node, owner));
    TRY(need_active(node));
    u8 *d = ACC_DATA(node);
    u32 load = rd_u32(c->data + 8);
    u32 capacity = rd_u32(c->data + 12);
    if (capacity == 0) FAIL(InvalidCapacity);
    if (load > capacity) FAIL(LoadExceedsCapacity);
    SolClock clock;
    sol_get_clock_sysvar(&clock);
    FIELD(u32, d, NODE_LOAD) = load;
    FIELD(u32, d, NODE_CAPACITY) = capacity;
    FIELD(i64, d, NODE_LAST_HEARTBEAT) = clock.unix_timestamp;
    FIELD(u64, d, NODE_LAST_HEARTBEAT_SLOT) = clock.slot;
    return 0;
}

/* update_node(url, lat, lon, country, capacity, version): [node w, owner s]. Only an active
 * node: a pending one must not change what the authority is asked to approve, a suspended one
 * must not move its entry while the authority looks at it. */
static u64 update_node(const Ctx *c) {
    if (c->num_accounts != 2 || c->data_len < 12) FAIL(InvalidInstruction);
    u64 url_len = rd_u32(c->data + 8);
    if (c->data_len != 12 + url_len + FIELDS_TAIL) FAIL(InvalidInstruction);
    u8 *node = c->acc[0], *owner = c->acc[1];
    TRY(need_signer(owner));
    TRY(need_writable(node));
    TRY(load_own_node(c, node, owner));
    TRY(need_active(node));
    const u8 *url = c->data + 12;
    TRY(validate_fields(url, url_len));
    write_fields(ACC_DATA(node), url, url_len);
    return 0;
}

/* deregister_node(): [registry w, node w, owner s w]. Refused while suspended: otherwise a
 * suspended node could shed its suspension by deregistering and registering again. A pending
 * node may leave (and take its rent back). */
static u64 deregister_node(const Ctx *c) {
    if (c->num_accounts != 3 || c->data_len != 8) FAIL(InvalidInstruction);
    u8 *reg = c->acc[0], *node = c->acc[1], *owner = c->acc[2];
    TRY(load_member_accounts(c, reg, node, owner));
    TRY(load_own_node(c, node, owner));
    if (ACC_DATA(node)[NODE_STATUS] == STATUS_SUSPENDED) FAIL(NodeSuspended);
    return remove_member(reg, REG_NODE_COUNT, node, owner);
}

/* The checks of an authority instruction on a node, [registry, node w, authority s]: the
 * account count and instruction length, the signer, the writable node, the registry and its
 * authority, the node's PDA from its stored owner. */
static u64 load_authority_node(const Ctx *c, u64 data_len) {
    if (c->num_accounts != 3 || c->data_len != data_len) FAIL(InvalidInstruction);
    u8 *reg = c->acc[0], *node = c->acc[1], *auth = c->acc[2];
    TRY(need_signer(auth));
    TRY(need_writable(node));
    TRY(load_registry(c, reg));
    TRY(need_authority(reg, auth));
    return load_node(c, node, (const Key *)(ACC_DATA(node) + NODE_OWNER));
}

/* set_node_status(status u8): [registry, node w, authority s] */
static u64 set_node_status(const Ctx *c) {
    TRY(load_authority_node(c, 9));
    u8 *node = c->acc[1];
    u8 status = c->data[8];
    if (status > STATUS_SUSPENDED) FAIL(InvalidStatus);
    ACC_DATA(node)[NODE_STATUS] = status;
    return 0;
}

/* approve_node(): [registry, node w, authority s]. Admits a pending node (pending -> active);
 * any other status is refused, so an approval cannot lift a suspension by accident. */
static u64 approve_node(const Ctx *c) {
    TRY(load_authority_node(c, 8));
    u8 *node = c->acc[1];
    if (ACC_DATA(node)[NODE_STATUS] != STATUS_PENDING) FAIL(NodeNotPending);
    ACC_DATA(node)[NODE_STATUS] = STATUS_ACTIVE;
    return 0;
}

/* ---------------------------------------------------------------- entrypoint */

u64 entrypoint(u8 *input) {
    Ctx c;
    u64 n = FIELD(u64, input, 0);
    if (n > MAX_ACCOUNTS) FAIL(InvalidInstruction);
    u8 *p = input + 8;
    for (u64 i = 0; i < n; i++) {
        if (p[0] == NON_DUP_MARKER) {
            c.acc[i] = p;
            p += 88 + *ACC_DATA_LEN(p) + MAX_PERMITTED_DATA_INCREASE;
            p = (u8 *)(((u64)p + 7) & ~7ULL);
            p += 8; /* rent_epoch */
        } else {
            u64 first = p[0];
            if (first >= i) FAIL(InvalidInstruction);
            c.acc[i] = c.acc[first];
            p += 8;
        }
    }
    c.num_accounts = n;
    c.data_len = FIELD(u64, p, 0);
    c.data = p + 8;
    const u8 *pid = c.data + c.data_len;
    if (((u64)pid & 7) == 0) {
        c.program_id = *(const Key *)pid;
    } else {
        for (int i = 0; i < 4; i++) c.program_id.w[i] = rd_u64(pid + 8 * i);
    }
    if (c.data_len < 8) FAIL(InvalidInstruction);
    switch (FIELD(u64, c.data, 0)) {
    case IX_INITIALIZE_REGISTRY: return initialize_registry(&c);
    case IX_ADD_ISSUER: return add_issuer(&c);
    case IX_REMOVE_ISSUER: return remove_issuer(&c);
    case IX_UPDATE_ISSUER: return update_issuer(&c);
    case IX_REGISTER_NODE: return register_node(&c);
    case IX_HEARTBEAT: return heartbeat(&c);
    case IX_UPDATE_NODE: return update_node(&c);
    case IX_DEREGISTER_NODE: return deregister_node(&c);
    case IX_SET_NODE_STATUS: return set_node_status(&c);
    case IX_APPROVE_NODE: return approve_node(&c);
    default: FAIL(InvalidInstruction);
    }
}
