/* A minimal, self-contained Solana program header (no SDK needed).
 *
 * Types, the handful of syscalls the registry program uses, and accessors for the loader's
 * serialized input (loader v2/v3 "aligned" serialization). Build with
 *   clang-19 -target bpf -mcpu=v2 -O2 -fno-builtin -ffreestanding
 * and link with programs/registry/link.py. Upstream BPF codegen limits apply: no signed
 * division, no variable-length memcpy/memset (use the syscalls), at most 5 arguments per
 * function, no mutable globals.
 */
#ifndef REGISTRY_SOL_H
#define REGISTRY_SOL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed int i32;
typedef signed long long i64;

#define U64_MAX 0xffffffffffffffffULL

/* A public key at an 8-aligned address (every key inside the serialized input is). */
typedef struct {
    u64 w[4];
} Key;

/* ---------------------------------------------------------------- syscall ABI structs */

typedef struct {
    const u8 *addr;
    u64 len;
} SolSeed;

typedef struct {
    const SolSeed *addr;
    u64 len;
} SolSignerSeeds;

typedef struct {
    Key *pubkey;
    u8 is_writable;
    u8 is_signer;
} SolAccountMeta;

typedef struct {
    Key *program_id;
    SolAccountMeta *accounts;
    u64 account_len;
    u8 *data;
    u64 data_len;
} SolInstruction;

typedef struct {
    Key *key;
    u64 *lamports;
    u64 data_len;
    u8 *data;
    Key *owner;
    u64 rent_epoch;
    u8 is_signer;
    u8 is_writable;
    u8 executable;
} SolAccountInfo;

typedef struct {
    u64 slot;
    i64 epoch_start_timestamp;
    u64 epoch;
    u64 leader_schedule_epoch;
    i64 unix_timestamp;
} SolClock;

typedef struct {
    u64 lamports_per_byte_year;
    u64 exemption_threshold_bits; /* an f64, decoded by hand (no soft-float here) */
    u8 burn_percent;
    u8 pad[7];
} SolRent;

/* ---------------------------------------------------------------- syscalls
 * Resolved by the loader from the murmur3 hash of the name (R_BPF_64_32 relocations). */

extern void sol_log_(const char *message, u64 len);
extern void sol_log_64_(u64 a, u64 b, u64 c, u64 d, u64 e);
extern void sol_memcpy_(void *dst, const void *src, u64 n);
extern void sol_memset_(void *dst, u8 c, u64 n);
extern u64 sol_create_program_address(const SolSeed *seeds, u64 seeds_len, const Key *program_id,
                                      Key *address);
extern u64 sol_try_find_program_address(const SolSeed *seeds, u64 seeds_len, const Key *program_id,
                                        Key *address, u8 *bump);
extern u64 sol_invoke_signed_c(const SolInstruction *instruction, const SolAccountInfo *infos,
                               u64 infos_len, const SolSignerSeeds *signers, u64 signers_len);
extern u64 sol_get_clock_sysvar(SolClock *clock);
extern u64 sol_get_rent_sysvar(SolRent *rent);

/* ---------------------------------------------------------------- serialized input
 * u64 num_accounts, then per account either a duplicate marker (u8 index of the first
 * occurrence + 7 padding) or:
 *   0 u8 0xff, 1 is_signer, 2 is_writable, 3 executable, 4 u32 original_data_len,
 *   8 key[32], 40 owner[32], 72 lamports u64, 80 data_len u64, 88 data[data_len],
 *   10240 bytes of realloc room, padding to 8, rent_epoch u64;
 * then u64 instruction data length, the data, and the 32-byte program id. */

#define NON_DUP_MARKER 0xff
#define MAX_PERMITTED_DATA_INCREASE 10240

#define ACC_IS_SIGNER(r) ((r)[1])
#define ACC_IS_WRITABLE(r) ((r)[2])
#define ACC_EXECUTABLE(r) ((r)[3])
#define ACC_KEY(r) ((Key *)((r) + 8))
#define ACC_OWNER(r) ((Key *)((r) + 40))
#define ACC_LAMPORTS(r) ((u64 *)((r) + 72))
#define ACC_DATA_LEN(r) ((u64 *)((r) + 80))
#define ACC_DATA(r) ((r) + 88)

static inline int key_eq(const Key *a, const Key *b) {
    return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) |
            (a->w[3] ^ b->w[3])) == 0;
}

static inline int key_is_zero(const Key *a) {
    return (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0;
}

/* Little-endian reads from possibly unaligned instruction data. */
static inline u32 rd_u32(const u8 *p) {
    return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
}

static inline u64 rd_u64(const u8 *p) {
    return (u64)rd_u32(p) | (u64)rd_u32(p + 4) << 32;
}

static inline void wr_u32(u8 *p, u32 v) {
    p[0] = (u8)v;
    p[1] = (u8)(v >> 8);
    p[2] = (u8)(v >> 16);
    p[3] = (u8)(v >> 24);
}

static inline void wr_u64(u8 *p, u64 v) {
    wr_u32(p, (u32)v);
    wr_u32(p + 4, (u32)(v >> 32));
}

#endif
