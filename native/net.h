// The data plane between the nodes of a cluster once the control plane has wired it: one TCP
// socket per pair of nodes, exchanges in a fixed order, and every wait bounded by a timeout.
// With keys, every message is followed on the wire by its tag (mac.h) and a message whose tag
// does not match fails in recv, before the caller sees its bytes.
#pragma once
#include <cstddef>
#include <cstdint>
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

    NetStats stats;

private:
    [[noreturn]] void fail(int peer, const std::string& what) const;
    size_t tag_bytes() const { return keys_.empty() ? 0 : kMacTagBytes; }
    // The tag of this node's next message to peer (empty without keys).
    MacTag outgoing_tag(int peer, const void* data, size_t bytes);
    // Fails unless `tag` is the tag of peer's next message to this node.
    void verify(int peer, const void* data, size_t bytes, const MacTag& tag);

    int node_;
    std::vector<int> fds_;
    std::vector<std::string> names_;
    int timeout_ms_;
    std::vector<MacKey> keys_;  // keys_[peer]; empty: no authentication
    std::vector<uint64_t> sent_messages_, received_messages_;  // per peer: the tags' counters
};

}  // namespace dllama
