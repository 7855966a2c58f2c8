// Tier 1's side of the shared-memory doorbell for a batch of calls, one per server: each call's request
// parts copied into its slot, then its NOTIFY sent, server after server, in one C call (ctypes releases
// the GIL for all of it, where NumPy copies and socket sends take it back after each part).
#include <sys/socket.h>
#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

extern "C" {

// rows rows of row_bytes bytes from src (row stride src_stride bytes) to dst, back to back; ring >= 0:
// then send rings[ring]'s NOTIFY.
struct ShmCopy {
  char* dst;
  const char* src;
  int64_t rows;
  int64_t row_bytes;
  int64_t src_stride;
  int64_t ring;
};

struct ShmRing {
  int64_t fd;
  const char* message;
  int64_t size;
};

// Copies in order, sending each ring after its last copy; errors[r] = 0 once ring r is sent, else the
// send's errno (the other rings are still sent).
void ShmWriteAndRing(const ShmCopy* copies, int64_t num_copies, const ShmRing* rings, int32_t* errors) {
  for (int64_t i = 0; i < num_copies; ++i) {
    const ShmCopy& c = copies[i];
    if (c.src_stride == c.row_bytes) {
      std::memcpy(c.dst, c.src, c.rows * c.row_bytes);
    } else {
      for (int64_t r = 0; r < c.rows; ++r) std::memcpy(c.dst + r * c.row_bytes, c.src + r * c.src_stride, c.row_bytes);
    }
    if (c.ring < 0) continue;
    const ShmRing& ring = rings[c.ring];
    const char* at = ring.message;
    int64_t left = ring.size;
    int32_t err = 0;
    while (left > 0) {
      ssize_t sent = send(static_cast<int>(ring.fd), at, left, MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        err = errno;
        break;
      }
      at += sent;
      left -= sent;
    }
    errors[c.ring] = err;
  }
}

}  // extern "C"
