/* LUKS encryption of qcow2 guest data (crypt_method 2), with OpenSSL's
 * libcrypto for every primitive (PBKDF2, hashes, AES-XTS): no cipher code of
 * our own.
 *
 * Facts this follows (docs/interop/qcow2.txt "Full disk encryption header
 * pointer" and "Data encryption", and the LUKS1 on-disk format):
 *  - the header extension names a region of the image file holding a LUKS1
 *    partition header (592 bytes) and its key material; key-material offsets
 *    are sectors relative to that region, the payload offset is unused;
 *  - a key slot is unlocked by PBKDF2(hash, passphrase, slot salt, slot
 *    iterations) -> a key that decrypts the slot's key material (the volume
 *    cipher, 512-byte sectors numbered from 0 within the material), which
 *    the anti-forensic merge turns into the master key; PBKDF2 of the master
 *    key with the digest salt and iterations must match the digest;
 *  - guest data is encrypted per 512-byte sector with the master key, the IV
 *    generated from the sector number of the *host* offset (QEMU uses the
 *    physical offset for LUKS): plain64 = the sector number, little endian,
 *    zero-padded to the IV size.
 * Only aes-xts-plain64 (QEMU's default, 128- or 256-bit AES) is implemented;
 * other ciphers and modes are refused by name. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "io/loop.h"
#include "qcow2/internal.h"

#define LUKS_SECTOR 512u
#define LUKS_HDR_SIZE QCOW2_LUKS_HDR_SIZE
#define LUKS_SLOTS QCOW2_LUKS_SLOTS
#define LUKS_SLOT_ACTIVE QCOW2_LUKS_SLOT_ACTIVE
#define LUKS_DIGEST_SIZE QCOW2_LUKS_DIGEST_SIZE
#define LUKS_SALT_SIZE QCOW2_LUKS_SALT_SIZE
/* Bounds against hostile headers (legitimate ones are far below: QEMU and
 * cryptsetup use 4000 stripes and about a second of PBKDF2 per slot). */
#define LUKS_MAX_STRIPES 65536u
#define LUKS_MAX_ITER (1u << 26)
#define LUKS_MAX_KEY 64u

struct luks {
    EVP_CIPHER_CTX *enc, *dec;  /* keyed with the master key; the IV is set per sector */
};

static void copy_str(char *dst, const uint8_t *src, size_t n)
{
    memcpy(dst, src, n);
    dst[n] = '\0';
}

int qcow2_luks_header_parse(const uint8_t *b, struct qcow2_luks_header *h, char *err, size_t errlen)
{
    static const uint8_t magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };
    if (memcmp(b, magic, 6)) {
        snprintf(err, errlen, "the encryption header is not a LUKS header (bad magic)");
        return -EINVAL;
    }
    if (be16_load(b + 6) != 1) {
        snprintf(err, errlen, "LUKS version %u is not supported (qcow2 uses LUKS1)", be16_load(b + 6));
        return -ENOTSUP;
    }
    copy_str(h->cipher, b + 8, 32);
    copy_str(h->mode, b + 40, 32);
    copy_str(h->hash, b + 72, 32);
    h->payload_offset = be32_load(b + 104);
    h->key_bytes = be32_load(b + 108);
    memcpy(h->mk_digest, b + 112, LUKS_DIGEST_SIZE);
    memcpy(h->mk_salt, b + 132, LUKS_SALT_SIZE);
    h->mk_iter = be32_load(b + 164);
    copy_str(h->uuid, b + 168, 40);
    for (int i = 0; i < LUKS_SLOTS; i++) {
        const uint8_t *s = b + 208 + i * 48;
        h->slot[i].active = be32_load(s);
        h->slot[i].iter = be32_load(s + 4);
        memcpy(h->slot[i].salt, s + 8, LUKS_SALT_SIZE);
        h->slot[i].km_offset = be32_load(s + 40);
        h->slot[i].stripes = be32_load(s + 44);
    }
    return 0;
}

/* The cipher for the volume's cipher spec, or NULL (message in err). */
static const EVP_CIPHER *pick_cipher(const struct qcow2_luks_header *h, char *err, size_t errlen)
{
    if (!strcmp(h->cipher, "aes") && !strcmp(h->mode, "xts-plain64")) {
        if (h->key_bytes == 32)
            return EVP_aes_128_xts();
        if (h->key_bytes == 64)
            return EVP_aes_256_xts();
    }
    snprintf(err, errlen, "LUKS cipher %s-%s with %u-byte keys is not supported "
             "(only aes-xts-plain64, QEMU's default)", h->cipher, h->mode, h->key_bytes);
    return NULL;
}

/* En/decrypt whole 512-byte sectors in place, sector numbers from `sector`. */
static int xts_sectors(EVP_CIPHER_CTX *ctx, uint64_t sector, uint8_t *buf, size_t len)
{
    for (size_t off = 0; off < len; off += LUKS_SECTOR, sector++) {
        uint8_t iv[16] = { 0 };
        uint64_t le = htole64(sector);
        memcpy(iv, &le, 8);
        int outl = 0;
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1 ||
            EVP_CipherUpdate(ctx, buf + off, &outl, buf + off, LUKS_SECTOR) != 1 || outl != LUKS_SECTOR)
            return -EIO;
    }
    return 0;
}

static EVP_CIPHER_CTX *keyed_ctx(const EVP_CIPHER *c, const uint8_t *key, int enc)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && EVP_CipherInit_ex(ctx, c, NULL, key, NULL, enc) == 1)
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* The anti-forensic merge: d = H(d ^ s_i) over all stripes but the last,
 * master key = d ^ last stripe; H hashes the block in digest-sized pieces,
 * each prefixed by its big-endian index. */
static int af_merge(const EVP_MD *md, const uint8_t *material, uint32_t stripes, uint32_t n, uint8_t *mk)
{
    uint8_t d[LUKS_MAX_KEY] = { 0 }, out[EVP_MAX_MD_SIZE];
    size_t dlen = (size_t)EVP_MD_get_size(md);
    for (uint32_t s = 0; s + 1 < stripes; s++) {
        for (uint32_t i = 0; i < n; i++)
            d[i] ^= material[(size_t)s * n + i];
        for (size_t piece = 0; piece * dlen < n; piece++) {
            size_t len = n - piece * dlen < dlen ? n - piece * dlen : dlen;
            uint8_t idx[4];
            be32_store(idx, (uint32_t)piece);
            EVP_MD_CTX *h = EVP_MD_CTX_new();
            int ok = h && EVP_DigestInit_ex(h, md, NULL) == 1 && EVP_DigestUpdate(h, idx, 4) == 1 &&
                     EVP_DigestUpdate(h, d + piece * dlen, len) == 1 && EVP_DigestFinal_ex(h, out, NULL) == 1;
            EVP_MD_CTX_free(h);
            if (!ok)
                return -EIO;
            memcpy(d + piece * dlen, out, len);
        }
    }
    for (uint32_t i = 0; i < n; i++)
        mk[i] = d[i] ^ material[(size_t)(stripes - 1) * n + i];
    OPENSSL_cleanse(d, sizeof(d));
    return 0;
}

/* Try one key slot: 1 and the master key in mk if the passphrase opens it,
 * 0 if not, -errno on failure. */
static int try_slot(struct qcow2 *q, const struct qcow2_luks_header *h, int i, const EVP_CIPHER *cipher,
                    const EVP_MD *md, const struct img_opts *o, uint8_t *mk, char *err, size_t errlen)
{
    uint32_t n = h->key_bytes, stripes = h->slot[i].stripes;
    uint64_t mat_len = (uint64_t)n * stripes, span = (mat_len + LUKS_SECTOR - 1) / LUKS_SECTOR * LUKS_SECTOR;
    uint64_t mat_off = (uint64_t)h->slot[i].km_offset * LUKS_SECTOR;
    if (!stripes || stripes > LUKS_MAX_STRIPES || mat_off < LUKS_HDR_SIZE ||
        mat_off > q->h.crypto_length || span > q->h.crypto_length - mat_off) {
        snprintf(err, errlen, "LUKS key slot %d: key material (%u stripes at sector %u) lies outside "
                 "the encryption header", i, stripes, h->slot[i].km_offset);
        return -EINVAL;
    }
    if (h->slot[i].iter == 0 || h->slot[i].iter > LUKS_MAX_ITER) {
        snprintf(err, errlen, "LUKS key slot %d: implausible PBKDF2 iteration count %u", i, h->slot[i].iter);
        return -EINVAL;
    }
    uint8_t key[LUKS_MAX_KEY], digest[LUKS_DIGEST_SIZE];
    uint8_t *mat = malloc(span);
    EVP_CIPHER_CTX *ctx = NULL;
    int r = mat ? 0 : -ENOMEM;
    if (r == 0) {
        ssize_t got = file_pread_any(&q->file, mat, span, q->h.crypto_offset + mat_off);
        r = got < 0 ? (int)got : (uint64_t)got < span ? -EIO : 0;
        if (r < 0)
            snprintf(err, errlen, "cannot read LUKS key slot %d: %s", i, strerror(-r));
    }
    if (r == 0 && PKCS5_PBKDF2_HMAC(o->key, (int)o->key_len, h->slot[i].salt, LUKS_SALT_SIZE,
                                    (int)h->slot[i].iter, md, (int)n, key) != 1)
        r = -EIO;
    if (r == 0 && !(ctx = keyed_ctx(cipher, key, 0)))
        r = -EIO;
    if (r == 0)
        r = xts_sectors(ctx, 0, mat, span);
    if (r == 0)
        r = af_merge(md, mat, stripes, n, mk);
    if (r == 0 && PKCS5_PBKDF2_HMAC((const char *)mk, (int)n, h->mk_salt, LUKS_SALT_SIZE, (int)h->mk_iter,
                                    md, LUKS_DIGEST_SIZE, digest) != 1)
        r = -EIO;
    if (r == -EIO && !err[0])
        snprintf(err, errlen, "LUKS key slot %d: the crypto library failed", i);
    EVP_CIPHER_CTX_free(ctx);
    OPENSSL_cleanse(key, sizeof(key));
    if (mat) {
        OPENSSL_cleanse(mat, span);
        free(mat);
    }
    if (r < 0)
        return r;
    return CRYPTO_memcmp(digest, h->mk_digest, LUKS_DIGEST_SIZE) == 0;
}

int qcow2_crypto_open(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen)
{
    err[0] = '\0';
    if (!o->key) {
        snprintf(err, errlen, "the image is encrypted (LUKS): give its passphrase with --key-file FILE "
                 "or --key-env VARIABLE");
        return -ENOKEY;
    }
    if (q->data_raw) {
        snprintf(err, errlen, "an encrypted image cannot keep a raw data file (data_file_raw)");
        return -ENOTSUP;
    }
    if (q->h.crypto_length < LUKS_HDR_SIZE) {
        snprintf(err, errlen, "the LUKS encryption header is too short (%llu bytes)",
                 (unsigned long long)q->h.crypto_length);
        return -EINVAL;
    }
    uint8_t raw[LUKS_HDR_SIZE];
    ssize_t got = file_pread_any(&q->file, raw, LUKS_HDR_SIZE, q->h.crypto_offset);
    if (got != LUKS_HDR_SIZE) {
        snprintf(err, errlen, "cannot read the LUKS header: %s", got < 0 ? strerror((int)-got) : "short read");
        return got < 0 ? (int)got : -EIO;
    }
    struct qcow2_luks_header h;
    int r = qcow2_luks_header_parse(raw, &h, err, errlen);
    if (r < 0)
        return r;
    const EVP_CIPHER *cipher = pick_cipher(&h, err, errlen);
    if (!cipher)
        return -ENOTSUP;
    const EVP_MD *md = EVP_get_digestbyname(h.hash);
    if (!md || EVP_MD_get_size(md) <= 0) {
        snprintf(err, errlen, "LUKS hash '%s' is not supported", h.hash);
        return -ENOTSUP;
    }
    if (h.mk_iter == 0 || h.mk_iter > LUKS_MAX_ITER) {
        snprintf(err, errlen, "LUKS header: implausible PBKDF2 iteration count %u", h.mk_iter);
        return -EINVAL;
    }
    uint8_t mk[LUKS_MAX_KEY];
    int opened = 0, active = 0;
    for (int i = 0; i < LUKS_SLOTS && !opened; i++) {
        if (h.slot[i].active != LUKS_SLOT_ACTIVE)
            continue;
        active++;
        opened = try_slot(q, &h, i, cipher, md, o, mk, err, errlen);
        if (opened < 0)
            return opened;
    }
    if (!opened) {
        snprintf(err, errlen, active ? "wrong passphrase: none of the %d active LUKS key slots accepts it"
                                     : "the LUKS header has no active key slot", active);
        return -EACCES;
    }
    struct luks *c = calloc(1, sizeof(*c));
    if (c) {
        c->enc = keyed_ctx(cipher, mk, 1);
        c->dec = keyed_ctx(cipher, mk, 0);
    }
    OPENSSL_cleanse(mk, sizeof(mk));
    if (!c || !c->enc || !c->dec) {
        if (c) {
            EVP_CIPHER_CTX_free(c->enc);
            EVP_CIPHER_CTX_free(c->dec);
        }
        free(c);
        snprintf(err, errlen, "the crypto library could not set up %s-%s", h.cipher, h.mode);
        return -EIO;
    }
    q->crypto = c;
    return 0;
}

void qcow2_crypto_free(struct qcow2 *q)
{
    if (!q->crypto)
        return;
    EVP_CIPHER_CTX_free(q->crypto->enc);
    EVP_CIPHER_CTX_free(q->crypto->dec);
    free(q->crypto);
    q->crypto = NULL;
}

/* Guest data at host offset `host` (both sector-aligned: every request and
 * every COW region is). */
int qcow2_crypto_encrypt(struct qcow2 *q, uint64_t host, uint8_t *buf, size_t len)
{
    if ((host | len) % LUKS_SECTOR)
        return -EIO;
    return xts_sectors(q->crypto->enc, host / LUKS_SECTOR, buf, len);
}

int qcow2_crypto_decrypt(struct qcow2 *q, uint64_t host, uint8_t *buf, size_t len)
{
    if ((host | len) % LUKS_SECTOR)
        return -EIO;
    return xts_sectors(q->crypto->dec, host / LUKS_SECTOR, buf, len);
}
