#include "map.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND(v0, v1, v2, v3) \
    do {                         \
        v0 += v1;                \
        v1 = ROTL(v1, 13);       \
        v1 ^= v0;                \
        v0 = ROTL(v0, 32);       \
        v2 += v3;                \
        v3 = ROTL(v3, 16);       \
        v3 ^= v2;                \
        v0 += v3;                \
        v3 = ROTL(v3, 21);       \
        v3 ^= v0;                \
        v2 += v1;                \
        v1 = ROTL(v1, 17);       \
        v1 ^= v2;                \
        v2 = ROTL(v2, 32);       \
    } while (0)

/* SipHash-1-3, as CPython uses for str hashing. */
static uint64_t siphash13(uint64_t k0, uint64_t k1, const uint8_t *in,
                          size_t len) {
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t b = (uint64_t)len << 56;
    size_t tail = len & 7;
    const uint8_t *end = in + len - tail;
    for (; in != end; in += 8) {
        uint64_t m;
        memcpy(&m, in, 8);
        v3 ^= m;
        SIPROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    for (size_t i = 0; i < tail; i++) b |= (uint64_t)in[i] << (8 * i);
    v3 ^= b;
    SIPROUND(v0, v1, v2, v3);
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

int bpn_map_init(bpn_map *m) {
    uint64_t keys[2];
    memset(m, 0, sizeof(*m));
    if (bpn_random_bytes(keys, sizeof(keys)) < 0) return -1;
    m->k0 = keys[0];
    m->k1 = keys[1];
    m->nbuckets = 16;
    m->buckets = calloc(m->nbuckets, sizeof(*m->buckets));
    return m->buckets ? 0 : -1;
}

void bpn_map_fini(bpn_map *m) {
    free(m->buckets);
    m->buckets = NULL;
    m->nbuckets = 0;
    m->count = 0;
}

uint64_t bpn_map_hash(const bpn_map *m, const char *key, size_t klen) {
    return siphash13(m->k0, m->k1, (const uint8_t *)key, klen);
}

bpn_map_node *bpn_map_get(const bpn_map *m, const char *key, size_t klen) {
    uint64_t h = bpn_map_hash(m, key, klen);
    for (bpn_map_node *n = m->buckets[h & (m->nbuckets - 1)]; n; n = n->next) {
        if (n->hash == h && n->klen == klen && memcmp(n->key, key, klen) == 0)
            return n;
    }
    return NULL;
}

static void grow(bpn_map *m) {
    size_t nb = m->nbuckets * 2;
    bpn_map_node **b = calloc(nb, sizeof(*b));
    if (!b) return; /* keep the longer chains; still correct */
    for (size_t i = 0; i < m->nbuckets; i++) {
        bpn_map_node *n = m->buckets[i];
        while (n) {
            bpn_map_node *next = n->next;
            n->next = b[n->hash & (nb - 1)];
            b[n->hash & (nb - 1)] = n;
            n = next;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = nb;
}

void bpn_map_insert(bpn_map *m, bpn_map_node *node) {
    if (m->count + 1 > m->nbuckets) grow(m);
    node->hash = bpn_map_hash(m, node->key, node->klen);
    bpn_map_node **slot = &m->buckets[node->hash & (m->nbuckets - 1)];
    node->next = *slot;
    *slot = node;
    m->count++;
}

void bpn_map_remove(bpn_map *m, bpn_map_node *node) {
    bpn_map_node **p = &m->buckets[node->hash & (m->nbuckets - 1)];
    while (*p && *p != node) p = &(*p)->next;
    if (*p) {
        *p = node->next;
        node->next = NULL;
        m->count--;
    }
}

void bpn_map_each(const bpn_map *m, void (*fn)(bpn_map_node *, void *),
                  void *arg) {
    for (size_t i = 0; i < m->nbuckets; i++) {
        bpn_map_node *n = m->buckets[i];
        while (n) {
            bpn_map_node *next = n->next;
            fn(n, arg);
            n = next;
        }
    }
}
