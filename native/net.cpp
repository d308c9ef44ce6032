#include "net.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <chrono>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace dllama {

namespace {

// One message on the wire: its payload, then its tag (none without keys). Both go out in one
// sendmsg and come in through one recvmsg, so a tag costs no extra packet or system call.
struct Wire {
    uint8_t* payload;
    size_t bytes;
    uint8_t* tag;
    size_t tag_bytes;

    size_t size() const { return bytes + tag_bytes; }

    // What is left of the message's first `avail` bytes (all of it by default) after its first
    // `done` bytes.
    msghdr rest(size_t done, iovec (&iov)[2], size_t avail = SIZE_MAX) const {
        avail = std::min(avail, size());
        int parts = 0;
        const size_t payload_end = std::min(avail, bytes);
        if (done < payload_end) iov[parts++] = {payload + done, payload_end - done};
        const size_t tag_done = done > bytes ? done - bytes : 0, tag_end = avail > bytes ? avail - bytes : 0;
        if (tag_done < tag_end) iov[parts++] = {tag + tag_done, tag_end - tag_done};
        msghdr m{};
        m.msg_iov = iov;
        m.msg_iovlen = parts;
        return m;
    }
};

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Mesh::Mesh(int node, std::vector<int> fds, std::vector<std::string> names, int timeout_ms,
           std::vector<std::string> keys)
    : node_(node), fds_(std::move(fds)), names_(std::move(names)), timeout_ms_(timeout_ms) {
    try {
        if (node_ < 0 || node_ >= (int)fds_.size()) throw std::invalid_argument("mesh: node index out of range");
        if (names_.size() != fds_.size()) throw std::invalid_argument("mesh: one name per node");
        for (size_t i = 0; i < fds_.size(); i++)
            if ((int)i != node_ && fds_[i] < 0) throw std::invalid_argument("mesh: missing socket to " + names_[i]);
        if (!keys.empty()) {
            if (keys.size() != fds_.size()) throw std::invalid_argument("mesh: one key per node (or none at all)");
            keys_.resize(keys.size());
            for (size_t i = 0; i < keys.size(); i++) {
                if ((int)i == node_) {
                    if (!keys[i].empty()) throw std::invalid_argument("mesh: this node's own key must be empty");
                    continue;
                }
                if (keys[i].size() != kMacKeyBytes)
                    throw std::invalid_argument("mesh: the key for " + names_[i] + " must be " +
                                                std::to_string(kMacKeyBytes) + " bytes, got " +
                                                std::to_string(keys[i].size()));
                std::memcpy(keys_[i].data(), keys[i].data(), kMacKeyBytes);
            }
        }
    } catch (...) {
        for (int fd : fds_)
            if (fd >= 0) close(fd);
        throw;
    }
    sent_messages_.assign(fds_.size(), 0);
    received_messages_.assign(fds_.size(), 0);
    for (size_t i = 0; i < fds_.size(); i++) {
        if ((int)i == node_) continue;
        const int one = 1;
        setsockopt(fds_[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        // TCP keepalive (a peer that vanishes without a FIN is noticed even while a worker waits
        // for the next step) is already on: dllama.cluster.sockets.keepalive sets it on every
        // socket before the control plane hands it over, and is the one place of its values.
    }
}

Mesh::~Mesh() {
    for (int fd : fds_)
        if (fd >= 0) close(fd);
}

void Mesh::fail(int peer, const std::string& what) const { throw NetError(peer, names_[peer] + ": " + what); }

MacTag Mesh::outgoing_tag(int peer, const void* data, size_t bytes) {
    if (keys_.empty()) return {};
    const auto start = std::chrono::steady_clock::now();
    const MacTag tag = message_tag(keys_[peer], (uint32_t)node_, sent_messages_[peer]++, data, bytes);
    stats.mac_seconds += seconds_since(start);
    return tag;
}

void Mesh::verify(int peer, const void* data, size_t bytes, const MacTag& tag) {
    if (keys_.empty()) return;
    const auto start = std::chrono::steady_clock::now();
    const bool good = tags_equal(tag, message_tag(keys_[peer], (uint32_t)peer, received_messages_[peer]++, data, bytes));
    stats.mac_seconds += seconds_since(start);
    if (!good) fail(peer, "message failed authentication (wrong cluster key or tampered traffic)");
}

void Mesh::send(int peer, const void* data, size_t bytes) {
    MacTag tag = outgoing_tag(peer, data, bytes);
    const Wire msg{const_cast<uint8_t*>(static_cast<const uint8_t*>(data)), bytes, tag.data(), tag_bytes()};
    size_t done = 0;
    while (done < msg.size()) {
        pollfd pfd{fds_[peer], POLLOUT, 0};
        const int ready = poll(&pfd, 1, timeout_ms_);
        if (ready == 0) fail(peer, "timed out sending");
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail(peer, std::string("poll failed: ") + strerror(errno));
        }
        iovec iov[2];
        const msghdr m = msg.rest(done, iov);
        const ssize_t n = ::sendmsg(fds_[peer], &m, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            fail(peer, std::string("send failed: ") + strerror(errno));
        }
        done += (size_t)n;
        stats.sent += (uint64_t)n;
    }
}

void Mesh::recv(int peer, void* data, size_t bytes, bool wait_forever) {
    MacTag tag{};
    const Wire msg{static_cast<uint8_t*>(data), bytes, tag.data(), tag_bytes()};
    size_t done = 0;
    while (done < msg.size()) {
        pollfd pfd{fds_[peer], POLLIN, 0};
        const int ready = poll(&pfd, 1, wait_forever && done == 0 ? -1 : timeout_ms_);
        if (ready == 0) fail(peer, "timed out waiting for data");
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail(peer, std::string("poll failed: ") + strerror(errno));
        }
        iovec iov[2];
        msghdr m = msg.rest(done, iov);
        const ssize_t n = ::recvmsg(fds_[peer], &m, 0);
        if (n == 0) fail(peer, "connection closed");
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            fail(peer, std::string("receive failed: ") + strerror(errno));
        }
        done += (size_t)n;
        stats.received += (uint64_t)n;
    }
    verify(peer, data, bytes, tag);
}

void Mesh::exchange(const uint8_t* out, uint8_t* in, size_t bytes) {
    begin_exchange(out, in, bytes);
    offer(bytes);
    finish_exchange();
}

void Mesh::begin_exchange(const uint8_t* out, uint8_t* in, size_t bytes) {
    const int n = size();
    x_out_ = out;
    x_in_ = in;
    x_bytes_ = bytes;
    x_ready_ = 0;
    x_open_ = true;
    x_taggers_.assign(n, std::nullopt);
    x_out_tags_.assign(n, MacTag{});
    x_in_tags_.assign(n, MacTag{});
    x_sent_.assign(n, 0);
    x_got_.assign(n, 0);
    if (keys_.empty()) return;
    for (int p = 0; p < n; p++)
        if (p != node_) x_taggers_[p].emplace(keys_[p], (uint32_t)node_, sent_messages_[p]++);
}

void Mesh::send_some(int p, size_t avail, bool early) {
    const Wire msg{const_cast<uint8_t*>(x_out_), x_bytes_, x_out_tags_[p].data(), tag_bytes()};
    if (x_sent_[p] >= std::min(avail, msg.size())) return;  // nothing new for this peer: no system call
    iovec iov[2];
    const msghdr m = msg.rest(x_sent_[p], iov, avail);
    const ssize_t s = ::sendmsg(fds_[p], &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (s < 0 && errno != EAGAIN && errno != EINTR) fail(p, std::string("send failed: ") + strerror(errno));
    if (s > 0) {
        x_sent_[p] += (size_t)s;
        stats.sent += (uint64_t)s;
        if (early) stats.sent_early += (uint64_t)s;
    }
}

void Mesh::offer(size_t ready) {
    if (!x_open_ || ready < x_ready_ || ready > x_bytes_) throw std::logic_error("mesh: offer outside an exchange or out of order");
    const int n = size();
    const bool last = ready == x_bytes_;
    if (!keys_.empty()) {
        // the tags grow with the pieces; the last piece completes them, so they leave with it
        const auto start = std::chrono::steady_clock::now();
        for (int p = 0; p < n; p++) {
            if (p == node_) continue;
            x_taggers_[p]->update(x_out_ + x_ready_, ready - x_ready_);
            if (last) x_out_tags_[p] = x_taggers_[p]->final();
        }
        stats.mac_seconds += seconds_since(start);
    }
    x_ready_ = ready;
    // The send buffers are free when an exchange starts (the last one was read): every peer gets
    // what its buffer takes at once, and the poll in finish_exchange only waits for the replies
    // (one system call fewer per all-reduce than polling for writability first).
    const size_t avail = last ? x_bytes_ + tag_bytes() : ready;
    for (int p = 0; p < n; p++)
        if (p != node_) send_some(p, avail, !last);
}

void Mesh::finish_exchange() {
    if (!x_open_ || x_ready_ != x_bytes_) throw std::logic_error("mesh: exchange finished before its message was complete");
    x_open_ = false;
    const int n = size();
    const size_t bytes = x_bytes_, total = bytes + tag_bytes();
    std::vector<Wire> incoming(n);
    for (int p = 0; p < n; p++)
        if (p != node_) incoming[p] = {x_in_ + (size_t)p * bytes, bytes, x_in_tags_[p].data(), tag_bytes()};
    std::vector<pollfd> pfds;
    std::vector<int> peer_of;
    for (;;) {
        pfds.clear();
        peer_of.clear();
        for (int p = 0; p < n; p++) {
            if (p == node_) continue;
            short events = 0;
            if (x_sent_[p] < total) events |= POLLOUT;
            if (x_got_[p] < total) events |= POLLIN;
            if (!events) continue;
            pfds.push_back({fds_[p], events, 0});
            peer_of.push_back(p);
        }
        if (pfds.empty()) return;
        const int ready = poll(pfds.data(), pfds.size(), timeout_ms_);
        if (ready == 0) fail(peer_of[0], "timed out in all-reduce");
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail(peer_of[0], std::string("poll failed: ") + strerror(errno));
        }
        for (size_t k = 0; k < pfds.size(); k++) {
            const int p = peer_of[k];
            iovec iov[2];
            if (pfds[k].revents & POLLIN) {
                msghdr m = incoming[p].rest(x_got_[p], iov);
                const ssize_t r = ::recvmsg(fds_[p], &m, MSG_DONTWAIT);
                if (r == 0) fail(p, "connection closed");
                if (r < 0 && errno != EAGAIN && errno != EINTR) fail(p, std::string("receive failed: ") + strerror(errno));
                if (r > 0) {
                    x_got_[p] += (size_t)r;
                    stats.received += (uint64_t)r;
                    if (x_got_[p] == total) verify(p, incoming[p].payload, bytes, x_in_tags_[p]);
                }
            } else if (pfds[k].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fail(p, "connection lost");
            }
            if (pfds[k].revents & POLLOUT) send_some(p, total, false);
        }
    }
}

}  // namespace dllama
