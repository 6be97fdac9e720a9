// New keys and values into a KV cache layer in one call: row t of keys and
// of values goes to (slots[t], every KV head, positions[t]). torch's indexed
// assignment does the same in two operators that cost a decode step about
// 15 us a layer each; this is two copies of head_dim values per token and
// head.
//
// cache_k, cache_v: [num_slots, kv_heads, max_len, head_dim] with the given
// slot and head strides (rows of head_dim contiguous); keys, values:
// [tokens, kv_heads, head_dim] with their own token and head strides (views
// into the projection's output). Any element type of elem_bytes bytes.

#include <stdint.h>
#include <string.h>

extern "C" {

// Returns 0 on success, 1 when a slot or position is out of range (nothing
// is written then).
int specray_cache_rows(char* cache_k, char* cache_v, int64_t slot_stride, int64_t head_stride,
                       int64_t num_slots, int64_t max_len, const int64_t* slots,
                       const int64_t* positions, int64_t tokens, int64_t kv_heads,
                       int64_t head_dim, const char* keys, int64_t k_token, int64_t k_head,
                       const char* values, int64_t v_token, int64_t v_head, int64_t elem_bytes) {
  for (int64_t t = 0; t < tokens; ++t)
    if (slots[t] < 0 || slots[t] >= num_slots || positions[t] < 0 || positions[t] >= max_len)
      return 1;
  const size_t row = static_cast<size_t>(head_dim * elem_bytes);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t at = slots[t] * slot_stride + positions[t] * head_dim;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t to = (at + h * head_stride) * elem_bytes;
      memcpy(cache_k + to, keys + (t * k_token + h * k_head) * elem_bytes, row);
      memcpy(cache_v + to, values + (t * v_token + h * v_head) * elem_bytes, row);
    }
  }
  return 0;
}

}  // extern "C"
