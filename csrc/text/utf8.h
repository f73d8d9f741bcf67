// UTF-8 decoding for the text kernels (csrc/text). Input comes from Python's str.encode(), so
// it is valid UTF-8 (lone surrogates aside, which decode to their code point); a malformed
// byte decodes to kBadCodePoint, one byte long, and callers treat it as unknown.
#pragma once
#include <cstdint>

namespace fastlm_text {

constexpr uint32_t kBadCodePoint = 0xFFFFFFFFu;

// The code point starting at s[i] (i < n) and its length in bytes.
inline uint32_t decode_utf8(const uint8_t* s, int64_t n, int64_t i, int* len) {
  const uint8_t b = s[i];
  if (b < 0x80) { *len = 1; return b; }
  int extra;
  uint32_t cp;
  if ((b & 0xE0) == 0xC0) { extra = 1; cp = b & 0x1F; }
  else if ((b & 0xF0) == 0xE0) { extra = 2; cp = b & 0x0F; }
  else if ((b & 0xF8) == 0xF0) { extra = 3; cp = b & 0x07; }
  else { *len = 1; return kBadCodePoint; }
  if (i + extra >= n) { *len = 1; return kBadCodePoint; }
  for (int k = 1; k <= extra; ++k) {
    const uint8_t c = s[i + k];
    if ((c & 0xC0) != 0x80) { *len = 1; return kBadCodePoint; }
    cp = (cp << 6) | (c & 0x3F);
  }
  *len = 1 + extra;
  return cp;
}

}  // namespace fastlm_text
