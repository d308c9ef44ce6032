#include "net.h"

#include <cerrno>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace dllama {

Mesh::Mesh(int node, std::vector<int> fds, std::vector<std::string> names, int timeout_ms)
    : node_(node), fds_(std::move(fds)), names_(std::move(names)), timeout_ms_(timeout_ms) {
    if (node_ < 0 || node_ >= (int)fds_.size()) throw std::invalid_argument("mesh: node index out of range");
    if (names_.size() != fds_.size()) throw std::invalid_argument("mesh: one name per node");
    for (size_t i = 0; i < fds_.size(); i++) {
        if ((int)i == node_) continue;
        if (fds_[i] < 0) throw std::invalid_argument("mesh: missing socket to " + names_[i]);
        const int one = 1;
        setsockopt(fds_[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        // a peer that vanishes without a FIN (power cut, cable) is noticed within ~20 s even
        // while a worker waits for the next step
        setsockopt(fds_[i], SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        const int idle = 10, interval = 2, count = 5;
        setsockopt(fds_[i], IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        setsockopt(fds_[i], IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
        setsockopt(fds_[i], IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
    }
}

Mesh::~Mesh() {
    for (int fd : fds_)
        if (fd >= 0) close(fd);
}

void Mesh::fail(int peer, const std::string& what) const { throw NetError(peer, names_[peer] + ": " + what); }

void Mesh::send(int peer, const void* data, size_t bytes) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    while (bytes > 0) {
        pollfd pfd{fds_[peer], POLLOUT, 0};
        const int ready = poll(&pfd, 1, timeout_ms_);
        if (ready == 0) fail(peer, "timed out sending");
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail(peer, std::string("poll failed: ") + strerror(errno));
        }
        const ssize_t n = ::send(fds_[peer], p, bytes, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            fail(peer, std::string("send failed: ") + strerror(errno));
        }
        p += n;
        bytes -= (size_t)n;
        stats.sent += (uint64_t)n;
    }
}

void Mesh::recv(int peer, void* data, size_t bytes, bool wait_forever) {
    uint8_t* p = static_cast<uint8_t*>(data);
    bool first = true;
    while (bytes > 0) {
        pollfd pfd{fds_[peer], POLLIN, 0};
        const int ready = poll(&pfd, 1, wait_forever && first ? -1 : timeout_ms_);
        if (ready == 0) fail(peer, "timed out waiting for data");
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail(peer, std::string("poll failed: ") + strerror(errno));
        }
        const ssize_t n = ::recv(fds_[peer], p, bytes, 0);
        if (n == 0) fail(peer, "connection closed");
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            fail(peer, std::string("receive failed: ") + strerror(errno));
        }
        first = false;
        p += n;
        bytes -= (size_t)n;
        stats.received += (uint64_t)n;
    }
}

void Mesh::exchange(const uint8_t* out, uint8_t* in, size_t bytes) {
    const int n = size();
    std::vector<size_t> sent(n, 0), got(n, 0);
    std::vector<pollfd> pfds;
    std::vector<int> peer_of;
    for (;;) {
        pfds.clear();
        peer_of.clear();
        for (int p = 0; p < n; p++) {
            if (p == node_) continue;
            short events = 0;
            if (sent[p] < bytes) events |= POLLOUT;
            if (got[p] < bytes) events |= POLLIN;
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
            if (pfds[k].revents & POLLIN) {
                const ssize_t r = ::recv(fds_[p], in + (size_t)p * bytes + got[p], bytes - got[p], MSG_DONTWAIT);
                if (r == 0) fail(p, "connection closed");
                if (r < 0 && errno != EAGAIN && errno != EINTR) fail(p, std::string("receive failed: ") + strerror(errno));
                if (r > 0) {
                    got[p] += (size_t)r;
                    stats.received += (uint64_t)r;
                }
            } else if (pfds[k].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fail(p, "connection lost");
            }
            if (pfds[k].revents & POLLOUT) {
                const ssize_t s = ::send(fds_[p], out + sent[p], bytes - sent[p], MSG_DONTWAIT | MSG_NOSIGNAL);
                if (s < 0 && errno != EAGAIN && errno != EINTR) fail(p, std::string("send failed: ") + strerror(errno));
                if (s > 0) {
                    sent[p] += (size_t)s;
                    stats.sent += (uint64_t)s;
                }
            }
        }
    }
}

}  // namespace dllama
