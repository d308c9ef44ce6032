// The data plane between the nodes of a cluster once the control plane has wired it: one TCP
// socket per pair of nodes, exchanges in a fixed order, and every wait bounded by a timeout.
// With keys, every message is followed on the wire by its tag (mac.h) and a message whose tag
// does not match fails in recv, before the caller sees its bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mac.h"

namespace dllama {

// A peer closed, reset, timed out or sent something malformed. The message names the peer.
class NetError : public std::runtime_error {
public:
    NetError(int peer, const std::string& what) : std::runtime_error(what), peer_(peer) {}
    int peer() const { return peer_; }

private:
    int peer_;
};

struct NetStats {
    uint64_t sent = 0, received = 0;  // bytes on the wire, tags included
    // of `sent`: exchange bytes that went out before their message was complete (offer), i.e.
    // while the matmul producing the rest of an all-reduce's partial still ran
    uint64_t sent_early = 0;
    double sync_seconds = 0;  // time spent in all-reduce exchanges
    double mac_seconds = 0;  // time spent computing and checking message tags (in all-reduces, part of sync_seconds)
};

class Mesh {
public:
    // fds[i] is the connected socket to node i (-1 for this node); the mesh owns and closes them,
    // also when it refuses its arguments. names[i] labels node i in errors ("worker 10.0.0.3:9999").
    // keys: empty for no authentication, else one per node: empty for this node, kMacKeyBytes
    // (shared by this node and node i) for every other.
    Mesh(int node, std::vector<int> fds, std::vector<std::string> names, int timeout_ms,
         std::vector<std::string> keys = {});
    ~Mesh();
    Mesh(const Mesh&) = delete;
    Mesh& operator=(const Mesh&) = delete;

    int node() const { return node_; }
    int size() const { return (int)fds_.size(); }
    const std::string& name(int peer) const { return names_[peer]; }

    void send(int peer, const void* data, size_t bytes);
    // wait_forever: a worker waiting for the root's next step may wait as long as it likes (a
    // vanished root is found by TCP keepalive); everything inside a step has the timeout.
    void recv(int peer, void* data, size_t bytes, bool wait_forever = false);
    // Sends `out` to every peer and receives `bytes` from each into in[peer * bytes], all at
    // once, so payloads larger than the socket buffers cannot deadlock.
    void exchange(const uint8_t* out, uint8_t* in, size_t bytes);
    // The same exchange with `out` made in pieces: begin_exchange, then offer(ready) whenever
    // out[0, ready) is final (every peer gets what its socket takes of it at once, nothing
    // waits), the last offer with ready = bytes, then finish_exchange (the rest of the sends
    // and every receive, as exchange). The wire carries the same single message per peer.
    void begin_exchange(const uint8_t* out, uint8_t* in, size_t bytes);
    void offer(size_t ready);
    void finish_exchange();

    NetStats stats;

private:
    [[noreturn]] void fail(int peer, const std::string& what) const;
    size_t tag_bytes() const { return keys_.empty() ? 0 : kMacTagBytes; }
    // The tag of this node's next message to peer (empty without keys).
    MacTag outgoing_tag(int peer, const void* data, size_t bytes);
    // Fails unless `tag` is the tag of peer's next message to this node.
    void verify(int peer, const void* data, size_t bytes, const MacTag& tag);
    // Sends peer what its socket takes of the open exchange's first `avail` bytes (its tag included
    // once avail passes the payload), without waiting.
    void send_some(int peer, size_t avail, bool early);

    int node_;
    std::vector<int> fds_;
    std::vector<std::string> names_;
    int timeout_ms_;
    std::vector<MacKey> keys_;  // keys_[peer]; empty: no authentication
    std::vector<uint64_t> sent_messages_, received_messages_;  // per peer: the tags' counters

    // the exchange under way (begin_exchange .. finish_exchange); vectors indexed by peer
    const uint8_t* x_out_ = nullptr;
    uint8_t* x_in_ = nullptr;
    size_t x_bytes_ = 0, x_ready_ = 0;
    bool x_open_ = false;
    std::vector<std::optional<MessageTagger>> x_taggers_;
    std::vector<MacTag> x_out_tags_, x_in_tags_;
    std::vector<size_t> x_sent_, x_got_;
};

}  // namespace dllama
