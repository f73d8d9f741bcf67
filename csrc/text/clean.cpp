// Document cleaning for `fastlm prepare`: whitespace/control normalisation, the length and
// Gopher repetition filters, and MinHash signatures, one pass of C++ per document. Each
// function reproduces a Python reference in fastlm/data/clean.py exactly (same text, same
// reason, same signature; tests/data/test_native.py compares them on adversarial text), at
// 10-30x its speed: those references are regex and numpy passes with per-document overheads
// that dominate on web-page-sized documents.
//
// Unicode NFC stays in Python (unicodedata); everything here works on UTF-8 bytes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "text/utf8.h"

namespace {

using fastlm_text::decode_utf8;

// str.isspace() in Python: what str.strip() and `if ln.strip()` remove.
bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// _CONTROL in clean.py: [\x00-\x08\x0b-\x1f\x7f-\x9f]
bool control(uint32_t c) { return c <= 0x08 || (c >= 0x0B && c <= 0x1F) || (c >= 0x7F && c <= 0x9F); }

// The passes below work on bytes: the characters they act on are ASCII or have fixed UTF-8
// forms, and every other byte (continuation bytes included) is copied through. Each writes
// to `out`, which has room for n bytes (no pass lengthens the text), and returns the length.

// text.replace("\r\n", "\n").replace("\r", "\n"), then _CONTROL removed (C1 controls
// U+0080-U+009F are C2 80 .. C2 9F).
int64_t strip_control(const uint8_t* s, int64_t n, uint8_t* out) {
  int64_t o = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t b = s[i];
    if (b == '\r') {
      out[o++] = '\n';
      if (i + 1 < n && s[i + 1] == '\n') ++i;
    } else if (b < 0x80) {
      if (!control(b)) out[o++] = b;
    } else if (b == 0xC2 && i + 1 < n && s[i + 1] >= 0x80 && s[i + 1] <= 0x9F) {
      ++i;
    } else {
      out[o++] = b;
    }
  }
  return o;
}

// Length in bytes of the _SPACES character at s[i], or 0: ' ', '\t', U+00A0 (C2 A0),
// U+2000-U+200A (E2 80 80-8A), U+3000 (E3 80 80).
inline int collapsible_at(const uint8_t* s, int64_t n, int64_t i) {
  const uint8_t b = s[i];
  if (b == ' ' || b == '\t') return 1;
  if (b < 0xC2) return 0;
  if (b == 0xC2) return (i + 1 < n && s[i + 1] == 0xA0) ? 2 : 0;
  if ((b == 0xE2 || b == 0xE3) && i + 2 < n && s[i + 1] == 0x80)
    return (b == 0xE2 ? s[i + 2] <= 0x8A && s[i + 2] >= 0x80 : s[i + 2] == 0x80) ? 3 : 0;
  return 0;
}

// _SPACES -> " " then _TRAILING ([ \t]+\n) -> "\n": after the first, a trailing run is one
// space, so a collapsed run followed by a newline is dropped.
int64_t collapse_spaces(const uint8_t* s, int64_t n, uint8_t* out) {
  int64_t o = 0;
  for (int64_t i = 0; i < n;) {
    int len = collapsible_at(s, n, i);
    if (len == 0) { out[o++] = s[i++]; continue; }
    while (i < n && (len = collapsible_at(s, n, i)) > 0) i += len;
    if (!(i < n && s[i] == '\n')) out[o++] = ' ';
  }
  return o;
}

// _BLANKS (\n{4,}) -> "\n\n\n", then str.strip(). Stripping first is equivalent: runs of
// newlines touching an end are stripped either way.
int64_t blanks_and_strip(const uint8_t* s, int64_t n, uint8_t* out) {
  int64_t a = 0, b = n;
  int len;
  while (a < n) {
    if (!py_space(decode_utf8(s, n, a, &len))) break;
    a += len;
  }
  while (b > a) {  // from the right: step back to each code point's first byte
    int64_t p = b - 1;
    while (p > a && (s[p] & 0xC0) == 0x80) --p;
    if (!py_space(decode_utf8(s, n, p, &len))) break;
    b = p;
  }
  int64_t o = 0, newlines = 0;
  for (int64_t i = a; i < b; ++i) {
    newlines = s[i] == '\n' ? newlines + 1 : 0;
    if (newlines <= 3) out[o++] = s[i];
  }
  return o;
}

struct Params {
  int64_t min_chars, max_chars;  // max_chars < 0: none
  int32_t repetition;
  double max_dup_line_frac, max_dup_line_char_frac;
  int32_t n_ngrams;
  const int32_t* ngram_n;  // ascending
  const double* ngram_limit;
  int64_t min_words_for_ngrams;
  int32_t near_dedup, num_perm, shingle;
  const uint64_t* perm_a;
  const uint64_t* perm_b;
};

// Reason codes; the Python side maps them to names.
enum Reason : int32_t { kKeep = 0, kEmpty = 1, kTooShort = 2, kTooLong = 3, kDupLines = 4,
                        kDupLineChars = 5, kTopNgram = 6 /* + index into ngram_n */ };

int64_t count_code_points(const uint8_t* s, int64_t n) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) k += (s[i] & 0xC0) != 0x80;
  return k;
}

bool all_space(const uint8_t* s, int64_t n) {
  for (int64_t i = 0; i < n;) {
    int len;
    if (!py_space(decode_utf8(s, n, i, &len))) return false;
    i += len;
  }
  return true;
}

constexpr uint64_t kP = 0x100000001B3ull;  // the word hash of clean.words()
constexpr uint64_t kNgramMul = 1000003ull;  // clean._ngram_hashes

// clean.words(): ASCII-whitespace-separated words, id = sum (byte+1) * P^k mod 2^64.
void words(const uint8_t* s, int64_t n, std::vector<uint64_t>& ids, std::vector<int64_t>& lens) {
  static constexpr bool kAsciiSpace[256] = {
      false, false, false, false, false, false, false, false, false, true, true, true, true, true,
      false, false, false, false, false, false, false, false, false, false, false, false, false,
      false, false, false, false, false, true};
  for (int64_t i = 0; i < n;) {
    if (kAsciiSpace[s[i]]) { ++i; continue; }
    uint64_t h = 0, pw = 1;
    const int64_t start = i;
    for (; i < n && !kAsciiSpace[s[i]]; ++i) {
      h += (uint64_t(s[i]) + 1) * pw;
      pw *= kP;
    }
    ids.push_back(h);
    lens.push_back(i - start);
  }
}

void ngram_hashes(const std::vector<uint64_t>& ids, int n, std::vector<uint64_t>& out) {
  out.assign(ids.size() - size_t(n) + 1, 0);
  for (size_t i = 0; i < out.size(); ++i) {
    uint64_t h = 0;
    for (int k = 0; k < n; ++k) h = h * kNgramMul + ids[i + size_t(k)];
    out[i] = h;
  }
}

struct LineHash {
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// clean.repetition_reason
int32_t repetition(const uint8_t* s, int64_t n, const std::vector<uint64_t>& ids,
                   const std::vector<int64_t>& lens, const Params& p) {
  std::vector<std::string_view> lines;
  for (int64_t i = 0; i <= n;) {
    int64_t j = i;
    while (j < n && s[j] != '\n') ++j;
    if (!all_space(s + i, j - i)) lines.emplace_back(reinterpret_cast<const char*>(s + i), size_t(j - i));
    i = j + 1;
  }
  if (lines.size() > 1) {
    std::unordered_set<std::string_view, LineHash> seen;
    seen.reserve(lines.size() * 2);
    int64_t dup_lines = 0, dup_chars = 0;
    for (const auto& ln : lines) {
      if (!seen.insert(ln).second) {
        ++dup_lines;
        dup_chars += count_code_points(reinterpret_cast<const uint8_t*>(ln.data()), int64_t(ln.size()));
      }
    }
    if (double(dup_lines) / double(lines.size()) > p.max_dup_line_frac) return kDupLines;
    const int64_t chars = std::max<int64_t>(1, count_code_points(s, n));
    if (double(dup_chars) / double(chars) > p.max_dup_line_char_frac) return kDupLineChars;
  }
  if (int64_t(ids.size()) < p.min_words_for_ngrams) return kKeep;
  int64_t total = 0;
  for (int64_t l : lens) total += l;
  total = std::max<int64_t>(1, total);
  std::vector<uint64_t> h, keys;
  std::vector<int32_t> counts;
  for (int32_t g = 0; g < p.n_ngrams; ++g) {
    const int nn = p.ngram_n[g];
    if (int64_t(ids.size()) < nn) continue;
    ngram_hashes(ids, nn, h);
    // Count with an open-addressing table. The most frequent n-gram, and among equally
    // frequent ones the smallest hash: what numpy's argmax over the sorted runs picks.
    size_t cap = 16;
    while (cap < 2 * h.size()) cap <<= 1;
    keys.assign(cap, 0);
    counts.assign(cap, 0);
    const int shift = 64 - __builtin_ctzll(cap);
    int64_t best = 0;
    uint64_t best_hash = 0;
    for (uint64_t x : h) {
      size_t slot = size_t((x * 0x9E3779B97F4A7C15ull) >> shift);
      while (counts[slot] != 0 && keys[slot] != x) slot = (slot + 1) & (cap - 1);
      keys[slot] = x;
      const int64_t c = ++counts[slot];
      if (c > best || (c == best && x < best_hash)) { best = c; best_hash = x; }
    }
    if (best < 2) continue;
    const size_t first = size_t(std::find(h.begin(), h.end(), best_hash) - h.begin());
    int64_t chars = 0;
    for (int k = 0; k < nn; ++k) chars += lens[first + size_t(k)];
    if (double(best * chars) / double(total) > p.ngram_limit[g]) return kTopNgram + g;
  }
  return kKeep;
}

// clean.MinHasher.signature
void minhash(const std::vector<uint64_t>& ids, const Params& p, uint64_t* sig) {
  if (ids.empty()) { std::fill(sig, sig + p.num_perm, uint64_t(0xFFFFFFFFu)); return; }
  const int n = std::min<int>(p.shingle, std::max<int>(1, int(ids.size())));
  std::vector<uint64_t> sh;
  ngram_hashes(ids, n, sh);
  std::sort(sh.begin(), sh.end());
  sh.erase(std::unique(sh.begin(), sh.end()), sh.end());
  std::vector<uint64_t> best(size_t(p.num_perm), ~uint64_t(0));
  for (uint64_t x : sh)
    for (int32_t k = 0; k < p.num_perm; ++k)
      best[size_t(k)] = std::min(best[size_t(k)], (x * p.perm_a[k] + p.perm_b[k]) >> 32);
  std::copy(best.begin(), best.end(), sig);
}

}  // namespace

extern "C" {

// Normalises documents [offsets[d], offsets[d+1]) of `text` into out / out_offsets (out needs
// as many bytes as text: normalisation never lengthens a document).
int64_t fastlm_clean_normalize(const uint8_t* text, const int64_t* offsets, int64_t n_docs,
                               int32_t strip, int32_t whitespace, uint8_t* out,
                               int64_t* out_offsets) {
  std::vector<uint8_t> a, b;
  int64_t total = 0;
  out_offsets[0] = 0;
  for (int64_t d = 0; d < n_docs; ++d) {
    const uint8_t* s = text + offsets[d];
    int64_t n = offsets[d + 1] - offsets[d];
    if (a.size() < size_t(n)) { a.resize(size_t(n)); b.resize(size_t(n)); }
    if (strip) { n = strip_control(s, n, a.data()); s = a.data(); }
    if (whitespace) {
      n = collapse_spaces(s, n, b.data());
      n = blanks_and_strip(b.data(), n, a.data());
      s = a.data();
    }
    std::memmove(out + total, s, size_t(n));
    total += n;
    out_offsets[d + 1] = total;
  }
  return total;
}

// Filters and signs normalised documents: reason[d] (a Reason), and when near_dedup the
// MinHash signature of each kept document in sigs[d * num_perm ...] (zeros for dropped ones).
void fastlm_clean_filter(const uint8_t* text, const int64_t* offsets, int64_t n_docs,
                         const Params* params, int32_t* reason, uint64_t* sigs) {
  const Params& p = *params;
  std::vector<uint64_t> ids;
  std::vector<int64_t> lens;
  for (int64_t d = 0; d < n_docs; ++d) {
    const uint8_t* s = text + offsets[d];
    const int64_t n = offsets[d + 1] - offsets[d];
    const int64_t chars = count_code_points(s, n);
    int32_t r = kKeep;
    ids.clear();
    lens.clear();
    words(s, n, ids, lens);
    const bool blank = all_space(s, n);
    if (chars < p.min_chars || blank) r = blank ? kEmpty : kTooShort;
    else if (p.max_chars >= 0 && chars > p.max_chars) r = kTooLong;
    else if (p.repetition) r = repetition(s, n, ids, lens, p);
    reason[d] = r;
    if (p.near_dedup) {
      uint64_t* sig = sigs + d * p.num_perm;
      if (r == kKeep) minhash(ids, p, sig);
      else std::fill(sig, sig + p.num_perm, uint64_t(0));
    }
  }
}

}  // extern "C"
