#include "mac.h"

#include <stdexcept>

#include "third_party/blake2/blake2.h"

namespace dllama {

MacTag message_tag(const MacKey& key, uint32_t sender, uint64_t counter, const void* payload, size_t bytes) {
    uint8_t prefix[12];
    for (int i = 0; i < 4; i++) prefix[i] = (uint8_t)(sender >> (8 * i));
    for (int i = 0; i < 8; i++) prefix[4 + i] = (uint8_t)(counter >> (8 * i));
    blake2b_state state;
    MacTag tag;
    if (blake2b_init_key(&state, tag.size(), key.data(), key.size()) != 0 ||
        blake2b_update(&state, prefix, sizeof prefix) != 0 || blake2b_update(&state, payload, bytes) != 0 ||
        blake2b_final(&state, tag.data(), tag.size()) != 0)
        throw std::logic_error("blake2b refused its parameters");  // only on a bad key or digest size
    return tag;
}

bool tags_equal(const MacTag& a, const MacTag& b) {
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < a.size(); i++) diff = diff | (uint8_t)(a[i] ^ b[i]);
    return diff == 0;
}

}  // namespace dllama
