// The walk over a matmul's row range and batch in tiles of up to 4 x 4, shared by the
// instruction-set files. Include it inside such a file's anonymous namespace, after its tile
// kernels: every instantiation then has internal linkage and carries only that file's
// instruction set (no AVX2 code can be picked by the linker for the portable path).
//
// A tile policy is a struct with
//   template <int R, int B> static void run(int len, const W* const* w_rows, const X* const* x_rows,
//                                           float* y, size_t y_stride);
// computing y[b * y_stride + r] for R weight rows and B activation rows of len units each.

constexpr int kMaxTileR = 4;
constexpr int kMaxTileB = 4;

template <typename Tile, typename W, typename X>
struct TileTable {
    using Fn = void (*)(int, const W* const*, const X* const*, float*, size_t);
    template <int R, int B>
    static constexpr Fn at() { return &Tile::template run<R, B>; }
    static constexpr Fn fns[kMaxTileR][kMaxTileB] = {
        {at<1, 1>(), at<1, 2>(), at<1, 3>(), at<1, 4>()},
        {at<2, 1>(), at<2, 2>(), at<2, 3>(), at<2, 4>()},
        {at<3, 1>(), at<3, 2>(), at<3, 3>(), at<3, 4>()},
        {at<4, 1>(), at<4, 2>(), at<4, 3>(), at<4, 4>()},
    };
};

// Rows outer, so every weight row is read from memory once whatever the batch: a tile of
// tile_r rows stays in L1 while it meets the batch, tile_b activation rows at a time.
// x_stride is in units of X; len is what a row holds in the tile's units (blocks or floats).
template <typename Tile, typename W, typename X>
void matmul_tiled(int tile_r, float* y, size_t y_stride, const uint8_t* w, size_t w_stride, const X* x,
                  size_t x_stride, int len, int r0, int r1, int batch) {
    const int tile_b = kMaxTileB;
    for (int r = r0; r < r1; r += tile_r) {
        const int nr = r1 - r < tile_r ? r1 - r : tile_r;
        const W* wr[kMaxTileR];
        for (int k = 0; k < nr; k++) wr[k] = reinterpret_cast<const W*>(w + size_t(r + k) * w_stride);
        for (int b = 0; b < batch; b += tile_b) {
            const int nbt = batch - b < tile_b ? batch - b : tile_b;
            const X* xb[kMaxTileB];
            for (int k = 0; k < nbt; k++) xb[k] = x + size_t(b + k) * x_stride;
            TileTable<Tile, W, X>::fns[nr - 1][nbt - 1](len, wr, xb, y + size_t(b) * y_stride + r, y_stride);
        }
    }
}

// The walk over a packed Q40 matrix (repack.h): row range [r0, r1), r0 a multiple of 8, one group
// of 8 rows at a time meeting the batch MaxB rows at a time (the group, 9 KB at 2048 columns,
// stays in L1 between them). A group policy is a struct with
//   template <int B> static void run(const Ctx& ctx, int nb, const uint8_t* group, int b, float* y,
//                                    size_t y_stride, int nr);
// computing y[k * y_stride + r] for the group's first nr rows and activation rows b .. b+B-1,
// instantiated for B = 1 .. MaxB.
template <typename Group, typename Ctx, int B>
void run_group_tile(int nbt, const Ctx& ctx, int nb, const uint8_t* g, int b, float* y, size_t y_stride, int nr) {
    if constexpr (B > 1) {
        if (nbt < B) return run_group_tile<Group, Ctx, B - 1>(nbt, ctx, nb, g, b, y, y_stride, nr);
    }
    Group::template run<B>(ctx, nb, g, b, y, y_stride, nr);
}

template <typename Group, typename Ctx, int MaxB = kMaxTileB>
void matmul_q40_groups(const Ctx& ctx, float* y, size_t y_stride, const uint8_t* w, int n, int r0, int r1,
                       int batch) {
    const size_t group_bytes = q40_group_bytes(n);
    for (int r = r0; r < r1; r += kQ40GroupRows) {
        const uint8_t* g = w + size_t(r / kQ40GroupRows) * group_bytes;
        const int nr = r1 - r < kQ40GroupRows ? r1 - r : kQ40GroupRows;
        for (int b = 0; b < batch; b += MaxB) {
            const int nbt = batch - b < MaxB ? batch - b : MaxB;
            run_group_tile<Group, Ctx, MaxB>(nbt, ctx, n / kBlockSize, g, b, y + size_t(b) * y_stride + r, y_stride, nr);
        }
    }
}
