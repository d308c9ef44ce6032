#include "mac.h"

#include <stdexcept>

namespace dllama {

namespace {

[[noreturn]] void refused() { throw std::logic_error("blake2b refused its parameters"); }  // only on a bad key or digest size

}  // namespace

MessageTagger::MessageTagger(const MacKey& key, uint32_t sender, uint64_t counter) {
    uint8_t prefix[12];
    for (int i = 0; i < 4; i++) prefix[i] = (uint8_t)(sender >> (8 * i));
    for (int i = 0; i < 8; i++) prefix[4 + i] = (uint8_t)(counter >> (8 * i));
    if (blake2b_init_key(&state_, kMacTagBytes, key.data(), key.size()) != 0 ||
        blake2b_update(&state_, prefix, sizeof prefix) != 0)
        refused();
}

void MessageTagger::update(const void* piece, size_t bytes) {
    if (blake2b_update(&state_, piece, bytes) != 0) refused();
}

MacTag MessageTagger::final() {
    MacTag tag;
    if (blake2b_final(&state_, tag.data(), tag.size()) != 0) refused();
    return tag;
}

MacTag message_tag(const MacKey& key, uint32_t sender, uint64_t counter, const void* payload, size_t bytes) {
    MessageTagger tagger(key, sender, counter);
    tagger.update(payload, bytes);
    return tagger.final();
}

bool tags_equal(const MacTag& a, const MacTag& b) {
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < a.size(); i++) diff = diff | (uint8_t)(a[i] ^ b[i]);
    return diff == 0;
}

}  // namespace dllama
