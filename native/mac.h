// Tags that authenticate the data plane's messages: keyed BLAKE2b (the BLAKE2 authors' reference
// code in third_party/blake2) with a 16-byte digest over
//     sender node index (u32 little-endian) || message counter (u64 little-endian) || payload
// The counter counts the messages of one direction (sender -> receiver) from 0, so a replayed,
// dropped or reordered message fails like a tampered one. A Python peer computes the same tag
// with hashlib.blake2b(sender + counter + payload, key=key, digest_size=16).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>

#include "third_party/blake2/blake2.h"

namespace dllama {

constexpr size_t kMacKeyBytes = 32;
constexpr size_t kMacTagBytes = 16;
using MacKey = std::array<uint8_t, kMacKeyBytes>;
using MacTag = std::array<uint8_t, kMacTagBytes>;

// The tag of one message whose payload comes in pieces (a partial sum sent while the matmul
// producing it still runs): the same tag as message_tag over the pieces end to end.
class MessageTagger {
public:
    MessageTagger(const MacKey& key, uint32_t sender, uint64_t counter);
    void update(const void* piece, size_t bytes);
    MacTag final();

private:
    blake2b_state state_;
};

MacTag message_tag(const MacKey& key, uint32_t sender, uint64_t counter, const void* payload, size_t bytes);

// Compares in time independent of where the tags differ, so timing reveals nothing of the right tag.
bool tags_equal(const MacTag& a, const MacTag& b);

}  // namespace dllama
