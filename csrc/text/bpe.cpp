// Byte-level BPE encoding for `fastlm prepare`: GPT-2 pre-tokenisation, then rank-ordered
// merges, with a per-thread cache of words already encoded. It produces the ids the
// `tokenizers` library gives for a ByteLevel + BPE tokenizer (checked by
// tests/data/test_native.py over every Unicode code point and real text), several times
// faster: that library spends most of its time in its general regex engine and per-token
// offset bookkeeping, neither of which packing shards needs.
//
// Plain C ABI (loaded with ctypes by fastlm/data/native.py), no torch: data preparation does
// not import torch.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <queue>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "text/utf8.h"

namespace {

using fastlm_text::decode_utf8;

// Character classes of the pre-tokeniser's regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// The table comes from Python (unicodedata); kUnsure marks code points whose class the two
// Unicode databases might disagree on (unassigned in Python's), so such a document is
// handed back to the tokenizers library instead of risking a different split.
enum : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3, kUnsure = 4 };
constexpr uint32_t kCodePoints = 0x110000;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

struct WordCache {
  // word bytes -> (offset, length) of its ids in `ids`
  std::unordered_map<std::string, std::pair<uint32_t, uint32_t>, StringHash, std::equal_to<>> map;
  std::vector<int32_t> ids;
};

// A word cache is dropped when it grows past this many ids (bounded memory on huge corpora;
// natural text has far fewer distinct words than this).
constexpr size_t kCacheIds = size_t(1) << 24;

inline uint8_t cls_at(const uint8_t* cls, const uint8_t* s, int64_t n, int64_t i, int* len) {
  const uint32_t cp = decode_utf8(s, n, i, len);
  return cp < kCodePoints ? cls[cp] : kUnsure;
}

// Splits s[0:n) into the regex's matches, calling emit(start, end) for each in order; false
// (after emitting a prefix) if a code point of unsure class is met.
template <class Emit>
bool pretokenize(const uint8_t* cls, const uint8_t* s, int64_t n, Emit&& emit) {
  int64_t i = 0;
  int len;
  while (i < n) {
    const uint8_t k = cls_at(cls, s, n, i, &len);
    if (k == kUnsure) return false;
    int64_t end = -1;
    if (s[i] == '\'' && i + 1 < n) {  // contractions, case-sensitive as in the regex
      const uint8_t a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') end = i + 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) end = i + 3;
    }
    if (end < 0) {
      int64_t j = i;  // ' ?X+': an optional leading space (U+0020 only), then a run of X
      uint8_t run = k;
      if (s[i] == ' ') {
        run = kSpace;
        if (i + 1 < n) {
          run = cls_at(cls, s, n, i + 1, &len);
          if (run == kUnsure) return false;
          j = i + 1;
        }
      }
      int64_t p = j;
      if (run != kSpace) {
        while (p < n) {
          const uint8_t c = cls_at(cls, s, n, p, &len);
          if (c == kUnsure) return false;
          if (c != run) break;
          p += len;
        }
        end = p;
      } else {
        // \s+(?!\S) then \s+: a whitespace run, less its last character when a non-space
        // follows and the run is longer than one (that character then leads the next word).
        int64_t last = i;
        int chars = 0;
        for (p = i; p < n; ++chars) {
          const uint8_t c = cls_at(cls, s, n, p, &len);
          if (c == kUnsure) return false;
          if (c != kSpace) break;
          last = p;
          p += len;
        }
        end = (p == n || chars == 1) ? p : last;
      }
    }
    emit(i, end);
    i = end;
  }
  return true;
}

struct Merge {
  int32_t rank, pos, id;
  // std::priority_queue is a max-heap: invert so the lowest rank, then leftmost, comes first
  bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

struct Model {
  int32_t byte_id[256];
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left,right) -> (rank,id)
  std::vector<uint8_t> cls;
  std::vector<WordCache> caches;

  const std::pair<int32_t, int32_t>* find(int32_t left, int32_t right) const {
    auto it = merges.find((uint64_t(uint32_t(left)) << 32) | uint32_t(right));
    return it == merges.end() ? nullptr : &it->second;
  }

  // BPE on one pre-tokenised word: repeatedly merge the adjacent pair of lowest rank,
  // leftmost first, as the tokenizers library's Word::merge_all does (a heap of candidate
  // merges, stale entries skipped when the pair they were made for no longer exists).
  void merge_word(const uint8_t* p, int n, std::vector<int32_t>& out) const {
    if (n == 1) { out.push_back(byte_id[p[0]]); return; }
    std::vector<int32_t> id(n), next(n), prev(n);
    std::vector<char> alive(n, 1);
    std::priority_queue<Merge> heap;
    for (int i = 0; i < n; ++i) {
      id[i] = byte_id[p[i]];
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    for (int i = 0; i + 1 < n; ++i)
      if (auto* m = find(id[i], id[i + 1])) heap.push({m->first, i, m->second});
    while (!heap.empty()) {
      const Merge top = heap.top();
      heap.pop();
      const int pos = top.pos, right = next[pos];
      if (!alive[pos] || right < 0) continue;
      const auto* m = find(id[pos], id[right]);
      if (m == nullptr || m->second != top.id) continue;
      id[pos] = top.id;
      alive[right] = 0;
      next[pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = pos;
      if (prev[pos] >= 0)
        if (auto* mm = find(id[prev[pos]], id[pos])) heap.push({mm->first, prev[pos], mm->second});
      if (next[pos] >= 0)
        if (auto* mm = find(id[pos], id[next[pos]])) heap.push({mm->first, pos, mm->second});
    }
    for (int i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
  }

  void encode_word(WordCache& cache, const uint8_t* p, int64_t n, std::vector<int32_t>& out) const {
    const std::string_view key(reinterpret_cast<const char*>(p), size_t(n));
    auto it = cache.map.find(key);
    if (it == cache.map.end()) {
      if (cache.ids.size() > kCacheIds) { cache.map.clear(); cache.ids.clear(); }
      const size_t start = cache.ids.size();
      merge_word(p, int(n), cache.ids);
      it = cache.map.emplace(std::string(key), std::make_pair(uint32_t(start),
                                                              uint32_t(cache.ids.size() - start))).first;
    }
    const int32_t* ids = cache.ids.data() + it->second.first;
    out.insert(out.end(), ids, ids + it->second.second);
  }

  // Pre-tokenise and encode one document; false if it holds a code point of unsure class
  // (nothing is appended then).
  bool encode_doc(WordCache& cache, const uint8_t* s, int64_t n, std::vector<int32_t>& out) const {
    const size_t out_start = out.size();
    const bool ok = pretokenize(cls.data(), s, n, [&](int64_t a, int64_t b) {
      encode_word(cache, s + a, b - a, out);
    });
    if (!ok) out.resize(out_start);
    return ok;
  }
};

}  // namespace

extern "C" {

// byte_ids[256]: id of each single byte; merges in rank order; cls: kCodePoints classes.
void* fastlm_bpe_new(const int32_t* byte_ids, const int32_t* left, const int32_t* right,
                     const int32_t* merged, int64_t n_merges, const uint8_t* cls) {
  auto* m = new Model();
  std::memcpy(m->byte_id, byte_ids, sizeof(m->byte_id));
  m->merges.reserve(size_t(n_merges) * 2);
  for (int64_t r = 0; r < n_merges; ++r) {
    const uint64_t key = (uint64_t(uint32_t(left[r])) << 32) | uint32_t(right[r]);
    m->merges.emplace(key, std::make_pair(int32_t(r), merged[r]));  // first (lowest rank) wins
  }
  m->cls.assign(cls, cls + kCodePoints);
  return m;
}

void fastlm_bpe_free(void* model) { delete static_cast<Model*>(model); }

// Encodes documents [offsets[d], offsets[d+1]) of `text` on `n_threads` threads. Writes the
// ids of document d to out[out_offsets[d] : out_offsets[d+1]] (out must hold as many ids as
// text has bytes: a token covers at least one byte). unsure[d] = 1 marks a document left
// for the caller (no ids written). Returns the total number of ids.
int64_t fastlm_bpe_encode(void* model, const uint8_t* text, const int64_t* offsets,
                          int64_t n_docs, int32_t n_threads, int32_t* out, int64_t* out_offsets,
                          uint8_t* unsure) {
  Model& m = *static_cast<Model*>(model);
  n_threads = std::max<int32_t>(1, std::min<int64_t>(n_threads, std::max<int64_t>(1, n_docs)));
  if (m.caches.size() < size_t(n_threads)) m.caches.resize(size_t(n_threads));
  std::vector<std::vector<int32_t>> per_doc(static_cast<size_t>(n_docs));
  std::atomic<int64_t> next_doc{0};
  auto work = [&](int t) {
    WordCache& cache = m.caches[size_t(t)];
    for (int64_t d; (d = next_doc.fetch_add(1)) < n_docs;) {
      const int64_t a = offsets[d], b = offsets[d + 1];
      per_doc[size_t(d)].reserve(size_t((b - a) / 3 + 8));
      unsure[d] = m.encode_doc(cache, text + a, b - a, per_doc[size_t(d)]) ? 0 : 1;
    }
  };
  if (n_threads == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < n_threads; ++t) pool.emplace_back(work, t);
    for (auto& th : pool) th.join();
  }
  int64_t total = 0;
  out_offsets[0] = 0;
  for (int64_t d = 0; d < n_docs; ++d) {
    const auto& v = per_doc[size_t(d)];
    std::memcpy(out + total, v.data(), v.size() * sizeof(int32_t));
    total += int64_t(v.size());
    out_offsets[d + 1] = total;
  }
  return total;
}

// The pre-tokeniser alone (for tests): writes the end offset of each piece of text[0:n) to
// ends (room for n); returns the number of pieces, or -1 at a code point of unsure class.
int64_t fastlm_pretokenize(const uint8_t* cls, const uint8_t* text, int64_t n, int64_t* ends) {
  int64_t k = 0;
  const bool ok = pretokenize(cls, text, n, [&](int64_t, int64_t b) { ends[k++] = b; });
  return ok ? k : -1;
}

}  // extern "C"
