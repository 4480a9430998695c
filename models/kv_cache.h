// defines: MLACache, KVCache — the latent KV cache of absorbed MLA decoding
// (DeepSeek-V2 §2.1.2, Table 1): per layer and token only the normalized latent
// kv_norm(c_kv) [kv_lora_rank] and the shared, already-rotated k_rope
// [qk_rope_head_dim] are kept — kv_lora_rank + qk_rope_head_dim numbers, against
// 2·n_h·d_h for multi-head attention. Keys and values are never materialized:
// MLAImpl::forward_absorbed folds W^UK into the query and applies W^UV after
// attending over the latent.
//
// Storage grows by doubling (appends are amortized O(new tokens)); crop() drops
// the newest entries (speculative decoding rejects drafted tokens that way).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <vector>

namespace moetrain {

struct MLACache {
  // new_latent: [B, T, C], new_k_rope: [B, T, R] for the next T positions.
  void append(const torch::Tensor& new_latent, const torch::Tensor& new_k_rope) {
    const int64_t T = new_latent.size(1);
    if (!latent_buf_.defined() || length_ + T > latent_buf_.size(1)) {
      const int64_t cap = std::max<int64_t>(length_ + T, latent_buf_.defined() ? 2 * latent_buf_.size(1) : 16);
      torch::Tensor l = torch::empty({new_latent.size(0), cap, new_latent.size(2)}, new_latent.options());
      torch::Tensor r = torch::empty({new_k_rope.size(0), cap, new_k_rope.size(2)}, new_k_rope.options());
      if (length_ > 0) {
        l.narrow(1, 0, length_).copy_(latent());
        r.narrow(1, 0, length_).copy_(k_rope());
      }
      latent_buf_ = l;
      k_rope_buf_ = r;
    }
    latent_buf_.narrow(1, length_, T).copy_(new_latent);
    k_rope_buf_.narrow(1, length_, T).copy_(new_k_rope);
    length_ += T;
  }
  torch::Tensor latent() const { return latent_buf_.narrow(1, 0, length_); }  // [B, S, C]
  torch::Tensor k_rope() const { return k_rope_buf_.narrow(1, 0, length_); }  // [B, S, R]
  int64_t length() const { return length_; }
  void crop(int64_t n) { length_ = std::min(length_, std::max<int64_t>(n, 0)); }
  // Numbers stored per cached token (kv_lora_rank + qk_rope_head_dim); 0 before the first append.
  int64_t numbers_per_token() const {
    return latent_buf_.defined() ? latent_buf_.size(2) + k_rope_buf_.size(2) : 0;
  }
  int64_t bytes_per_token() const {
    return latent_buf_.defined() ? numbers_per_token() * static_cast<int64_t>(latent_buf_.element_size()) : 0;
  }

 private:
  torch::Tensor latent_buf_;  // [B, capacity, C]
  torch::Tensor k_rope_buf_;  // [B, capacity, R]
  int64_t length_ = 0;
};

// One MLACache per decoder layer of a stack (the main model's L layers, or one MTP block).
struct KVCache {
  explicit KVCache(int64_t n_layers = 0) : layers(static_cast<size_t>(n_layers)) {}
  int64_t length() const { return layers.empty() ? 0 : layers[0].length(); }
  void crop(int64_t n) {
    for (MLACache& c : layers) c.crop(n);
  }
  int64_t bytes_per_token() const {
    int64_t b = 0;
    for (const MLACache& c : layers) b += c.bytes_per_token();
    return b;
  }
  std::vector<MLACache> layers;
};

}  // namespace moetrain
