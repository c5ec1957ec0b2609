/* A chained hash map with byte-string keys and SipHash-1-3 under a random
 * key (job ids come from users: no hash flooding). Nodes are intrusive: the
 * owner embeds a bpn_map_node whose key points into the owner's storage.
 * Not thread-safe: the owner's lock guards it. */
#ifndef BPN_MAP_H
#define BPN_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct bpn_map_node {
    struct bpn_map_node *next;
    uint64_t hash;
    const char *key;
    size_t klen;
} bpn_map_node;

typedef struct {
    bpn_map_node **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
    uint64_t k0, k1;
} bpn_map;

/* Returns 0, or -1 if the buckets or the random key could not be had. */
int bpn_map_init(bpn_map *m);
/* Frees the buckets only; the nodes belong to their owners. */
void bpn_map_fini(bpn_map *m);
/* Hashes a key with this map's secret key. */
uint64_t bpn_map_hash(const bpn_map *m, const char *key, size_t klen);
/* Returns the node with this key, or NULL. */
bpn_map_node *bpn_map_get(const bpn_map *m, const char *key, size_t klen);
/* Inserts a node whose key is not present yet (node->key, klen set by the
 * caller). Never fails: growth is skipped when memory is short. */
void bpn_map_insert(bpn_map *m, bpn_map_node *node);
/* Unlinks a node that is in the map. */
void bpn_map_remove(bpn_map *m, bpn_map_node *node);

/* Calls fn on every node; fn may not modify the map. */
void bpn_map_each(const bpn_map *m, void (*fn)(bpn_map_node *, void *),
                  void *arg);

#endif
