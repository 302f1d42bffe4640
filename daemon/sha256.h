/* daemon/sha256.h - SHA-256 (FIPS 180-4) of a byte buffer.
 *
 * The image-embedding cache keys entries by the digest of the image bytes.
 * A cryptographic hash is used, not a fast 64-bit one, because the cache is
 * shared by every client: a key collision would hand one client another
 * client's image, and SHA-256 collisions cannot be crafted. Hashing runs at
 * a few hundred MB/s, well under a millisecond for a typical JPEG.
 */
#ifndef VLM_DAEMON_SHA256_H
#define VLM_DAEMON_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define VLM_SHA256_SIZE 32

/* Writes the 32-byte digest of data[0..size) to out. */
void vlm_sha256(const void *data, size_t size, uint8_t out[VLM_SHA256_SIZE]);

#endif
