//! The x86-64 micro-kernels of [`super`]: each adds to one `rm x rn` tile of `C` (row-major
//! f32, `rn` contiguous) the product of `groups` packed groups of `X` (the tile's `rm` rows,
//! 4 bytes per row per group) and of the weight micro-panel (`rn` outputs, 4 bytes per
//! output per group), as [`super::Lanes`] lays them out.
//!
//! The AVX-512 kernels are inline assembly: the AVX-512 intrinsics and target features are
//! newer than the workspace's minimum Rust (1.88). Each is a function of its own
//! (`#[inline(never)]`) whose body is the assembly alone, so no value of the caller lives in
//! a vector register across it (the ABI makes every vector register caller-saved, zmm16-31
//! included, which the block uses without naming them as operands). The AVX2 kernels are
//! intrinsics with the tile in local arrays the compiler keeps in registers.
//!
//! Every kernel's safe wrapper checks the slice lengths the assembly reads and writes.

use std::arch::asm;
use std::arch::x86_64::*;

/// Whether the AVX2 + FMA + F16C kernels can run here.
pub fn has_avx2_fma() -> bool {
    super::super::bf16::has_avx2_fma()
}

/// Whether the 512-bit f32 kernel can run: AVX-512 F, BW, VL and DQ (the OS saves the
/// registers: the standard library's detection checks XCR0), with AVX2 + FMA.
pub fn has_avx512() -> bool {
    has_avx2_fma()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512dq")
}

/// Whether the AVX-512 VNNI kernel (`vpdpbusd` on 512-bit vectors) can run.
pub fn has_avx512_vnni() -> bool {
    has_avx512() && std::is_x86_feature_detected!("avx512vnni")
}

/// Whether the AVX-512 BF16 kernel (`vdpbf16ps`) can run. Read from CPUID leaf 7,
/// sub-leaf 1 (EAX bit 5): the standard library's name for it may be newer than the
/// workspace's minimum Rust; [`has_avx512`] covers the OS's saving of the registers.
pub fn has_avx512_bf16() -> bool {
    if !has_avx512() {
        return false;
    }
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 exists where AVX-512 F was detected
    // above (its flags come from leaf 7 sub-leaf 0); sub-leaf 1 reads zeros on CPUs that
    // do not define it. (The intrinsic is an `unsafe fn` on older Rust, safe on newer.)
    let leaf = unsafe { __cpuid_count(7, 1) };
    leaf.eax & (1 << 5) != 0
}

/// Whether the AMX kernel can run: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7,
/// EDX bits 24 and 22) and the kernel granted this process the tile data state, asked for
/// once per process (Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM)`; other systems: never).
pub fn has_amx_bf16() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 sub-leaf 0 is defined on every CPU
        // with AVX2 (checked first), and reads zeros where a feature is absent.
        let leaf = has_avx2_fma().then(|| unsafe { __cpuid_count(7, 0) });
        leaf.is_some_and(|l| l.edx & (1 << 24) != 0 && l.edx & (1 << 22) != 0) && request_amx()
    })
}

/// Asks Linux for the AMX tile data state (feature 18) for this process and confirms it.
#[cfg(target_os = "linux")]
fn request_amx() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: the system call only widens the register state this process may use; it reads
    // and writes no memory, and `syscall` clobbers rcx and r11 (declared).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret != 0 {
        return false;
    }
    let mut mask = 0u64;
    let ret: i64;
    // SAFETY: the system call writes the permitted feature mask to `mask`, 8 bytes this
    // function owns and lends for the call; `syscall` clobbers rcx and r11 (declared).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_GET_XCOMP_PERM,
            in("rsi") &mut mask as *mut u64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0 && mask & (1 << XFEATURE_XTILEDATA) != 0
}

#[cfg(not(target_os = "linux"))]
fn request_amx() -> bool {
    false
}

// ---------------------------------------------------------------------------------------
// AMX (inline assembly)
// ---------------------------------------------------------------------------------------

/// Tile rows and outputs of the AMX kernel: 2 x 2 tiles of 16 x 16 f32.
pub const AMX_TILE: (usize, usize) = (32, 32);

/// Bytes of one k step (32 values) of the AMX kernel's inputs: two A tiles (16 rows x 32
/// bf16) or two B tiles (16 bf16 pairs x 16 outputs), each 1 KiB.
pub const AMX_STEP_BYTES: usize = 2048;

/// The tile configuration: palette 1, tiles 0-7 all 16 rows of 64 bytes (C: tmm0-3, A:
/// tmm4-5, B: tmm6-7).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static TILE_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut i = 0;
    while i < 8 {
        c[16 + 2 * i] = 64;
        c[48 + i] = 16;
        i += 1;
    }
    TileConfig(c)
};

thread_local! {
    /// Whether this thread holds an [`AmxTiles`] (its tile configuration is loaded).
    static AMX_ACTIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This thread's AMX tiles, configured for [`amx_32x32`] (palette 1, tiles 0-7 of 16 rows x
/// 64 bytes) while the value lives, released when it drops. One per thread at a time, and
/// it never leaves the thread (it is neither `Send` nor `Sync`), so a kernel given one runs
/// on configured tiles.
pub struct AmxTiles {
    _thread: std::marker::PhantomData<*const ()>,
}

impl AmxTiles {
    /// Configures this thread's tiles; `None` where the CPU or the OS lacks AMX, or this
    /// thread already holds tiles.
    pub fn configure() -> Option<AmxTiles> {
        if !has_amx_bf16() || AMX_ACTIVE.with(|a| a.replace(true)) {
            return None;
        }
        // SAFETY: AMX and its state were granted (`has_amx_bf16`); `ldtilecfg` reads the 64
        // bytes of the static configuration and changes only the tile state, which no
        // compiled code uses.
        unsafe {
            asm!(
                "ldtilecfg [{cfg}]",
                cfg = in(reg) TILE_CONFIG.0.as_ptr(),
                options(nostack, readonly, preserves_flags),
            )
        };
        Some(AmxTiles {
            _thread: std::marker::PhantomData,
        })
    }
}

impl Drop for AmxTiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure` on this thread (the value never
        // leaves it); `tilerelease` returns the tile state to its initial state and touches
        // no memory.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        AMX_ACTIVE.with(|a| a.set(false));
    }
}

/// `C (32 x 32) += W X^T` with `tdpbf16ps`, over `steps` k steps of 32 values: C's row
/// `j` is output `j`, its column `r` input row `r` (the transpose of the other kernels'
/// tiles). The weights are the A tiles, read in place: 32 rows of bf16, `w_stride` bytes
/// apart (a stored row-major weight, or a padded copy of it), 64 bytes per step. The inputs
/// are the B tiles, `parts` parts of them `part_bytes` apart (the exact path's three bf16
/// parts of each f32 input): per step, input rows 0-15 then 16-31, each 16 bf16 pairs of k
/// x 16 rows, 2 KiB per step. C is row-major f32.
#[allow(clippy::too_many_arguments)]
pub fn amx_32x32(
    _tiles: &AmxTiles,
    w: &[u8],
    w_stride: usize,
    x: &[u8],
    steps: usize,
    parts: usize,
    part_bytes: usize,
    c: &mut [f32],
) {
    assert!(
        parts >= 1
            && steps >= 1
            && w.len() >= 31 * w_stride + steps * 64
            && x.len() >= (parts - 1) * part_bytes + steps * AMX_STEP_BYTES
            && c.len() >= 32 * 32
    );
    // SAFETY: the lengths were checked: step `s` reads bytes `r * w_stride + 64 s ..+64` of
    // the weights for rows r < 32 and 2 KiB of each part's inputs inside the slices, and
    // the block reads and writes the 4 KiB of C, with tile loads and stores that need no
    // alignment; `_tiles` proves this thread's tiles are configured (AMX granted).
    unsafe {
        amx_32x32_raw(
            w.as_ptr(),
            w_stride,
            x.as_ptr(),
            steps,
            parts,
            part_bytes,
            c.as_mut_ptr(),
        )
    }
}

#[inline(never)]
unsafe fn amx_32x32_raw(
    w: *const u8,
    w_stride: usize,
    x: *const u8,
    steps: usize,
    parts: usize,
    part_bytes: usize,
    c: *mut f32,
) {
    // SAFETY: as in `amx_32x32`, whose checks cover every access.
    unsafe {
        asm!(
            "mov {s}, 128",
            "tileloadd tmm0, [{c} + {s}*1]",
            "tileloadd tmm1, [{c} + {s}*1 + 64]",
            "tileloadd tmm2, [{c} + {s}*1 + 2048]",
            "tileloadd tmm3, [{c} + {s}*1 + 2112]",
            "mov {s}, 64",
            // {w16}: weight row 16.
            "mov {w16}, {ws}",
            "shl {w16}, 4",
            "add {w16}, {w}",
            "2:",
            "tileloadd tmm4, [{w} + {ws}*1]",
            "tileloadd tmm5, [{w16} + {ws}*1]",
            "mov {a}, {x}",
            "mov {p}, {parts}",
            "4:",
            "tileloadd tmm6, [{a} + {s}*1]",
            "tileloadd tmm7, [{a} + {s}*1 + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, {pb}",
            "dec {p}",
            "jnz 4b",
            "add {w}, 64",
            "add {w16}, 64",
            "add {x}, 2048",
            "dec {k}",
            "jnz 2b",
            "mov {s}, 128",
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c} + {s}*1 + 64], tmm1",
            "tilestored [{c} + {s}*1 + 2048], tmm2",
            "tilestored [{c} + {s}*1 + 2112], tmm3",
            c = in(reg) c,
            w = inout(reg) w => _,
            ws = in(reg) w_stride,
            w16 = out(reg) _,
            x = inout(reg) x => _,
            k = inout(reg) steps => _,
            parts = in(reg) parts,
            pb = in(reg) part_bytes,
            a = out(reg) _,
            p = out(reg) _,
            s = out(reg) _,
            options(nostack),
        )
    }
}

// ---------------------------------------------------------------------------------------
// AVX-512 (inline assembly)
// ---------------------------------------------------------------------------------------

/// Tile rows and outputs of the 512-bit f32 and bf16 kernels.
pub const F32_512_TILE: (usize, usize) = (12, 32);
/// Tile rows and outputs of the VNNI kernel.
pub const Q8_512_TILE: (usize, usize) = (6, 32);

/// `zmm$z = C[$off bytes..]`.
#[rustfmt::skip]
macro_rules! load_c {
    ($z:literal, $off:literal) => {
        concat!("vmovups zmm", $z, ", zmmword ptr [{c} + ", $off, "]")
    };
}

/// `C[$off bytes..] = zmm$z`.
#[rustfmt::skip]
macro_rules! store_c {
    ($z:literal, $off:literal) => {
        concat!("vmovups zmmword ptr [{c} + ", $off, "], zmm", $z)
    };
}

/// One input row of a group: its 4 bytes at `x + $xo` broadcast into `zmm$t`, then
/// `$op` of the two weight vectors (zmm24, zmm25) into the row's accumulators.
#[rustfmt::skip]
macro_rules! row_step {
    ($bcst:literal, $op:literal, $a:literal, $b:literal, $xo:literal, $t:literal) => {
        concat!(
            $bcst, " zmm", $t, ", dword ptr [{x} + ", $xo, "]\n",
            $op, " zmm", $a, ", zmm24, zmm", $t, "\n",
            $op, " zmm", $b, ", zmm25, zmm", $t
        )
    };
}

/// The 12 x 32 kernel's body with a multiply-add `$op` and broadcast `$bcst`: C's tile in
/// zmm0-23 (row r in zmm 2r and 2r+1), weights in zmm24-25, broadcasts in zmm26-27.
macro_rules! tile_12x32 {
    ($bcst:literal, $op:literal, $w:expr, $x:expr, $groups:expr, $c:expr) => {
        asm!(
            load_c!(0, 0), load_c!(1, 64), load_c!(2, 128), load_c!(3, 192),
            load_c!(4, 256), load_c!(5, 320), load_c!(6, 384), load_c!(7, 448),
            load_c!(8, 512), load_c!(9, 576), load_c!(10, 640), load_c!(11, 704),
            load_c!(12, 768), load_c!(13, 832), load_c!(14, 896), load_c!(15, 960),
            load_c!(16, 1024), load_c!(17, 1088), load_c!(18, 1152), load_c!(19, 1216),
            load_c!(20, 1280), load_c!(21, 1344), load_c!(22, 1408), load_c!(23, 1472),
            "test {k}, {k}",
            "jz 3f",
            "2:",
            "vmovups zmm24, zmmword ptr [{w}]",
            "vmovups zmm25, zmmword ptr [{w} + 64]",
            row_step!($bcst, $op, 0, 1, 0, 26),
            row_step!($bcst, $op, 2, 3, 4, 27),
            row_step!($bcst, $op, 4, 5, 8, 26),
            row_step!($bcst, $op, 6, 7, 12, 27),
            row_step!($bcst, $op, 8, 9, 16, 26),
            row_step!($bcst, $op, 10, 11, 20, 27),
            row_step!($bcst, $op, 12, 13, 24, 26),
            row_step!($bcst, $op, 14, 15, 28, 27),
            row_step!($bcst, $op, 16, 17, 32, 26),
            row_step!($bcst, $op, 18, 19, 36, 27),
            row_step!($bcst, $op, 20, 21, 40, 26),
            row_step!($bcst, $op, 22, 23, 44, 27),
            "add {w}, 128",
            "add {x}, 48",
            "dec {k}",
            "jnz 2b",
            "3:",
            store_c!(0, 0), store_c!(1, 64), store_c!(2, 128), store_c!(3, 192),
            store_c!(4, 256), store_c!(5, 320), store_c!(6, 384), store_c!(7, 448),
            store_c!(8, 512), store_c!(9, 576), store_c!(10, 640), store_c!(11, 704),
            store_c!(12, 768), store_c!(13, 832), store_c!(14, 896), store_c!(15, 960),
            store_c!(16, 1024), store_c!(17, 1088), store_c!(18, 1152), store_c!(19, 1216),
            store_c!(20, 1280), store_c!(21, 1344), store_c!(22, 1408), store_c!(23, 1472),
            "vzeroupper",
            w = inout(reg) $w => _,
            x = inout(reg) $x => _,
            k = inout(reg) $groups => _,
            c = in(reg) $c,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        )
    };
}

/// Checks the lengths a 12 x 32 kernel reads and writes.
fn check_12x32(w: &[u8], x: &[u8], groups: usize, c: &[f32]) {
    let (rm, rn) = F32_512_TILE;
    assert!(w.len() >= groups * rn * 4 && x.len() >= groups * rm * 4 && c.len() >= rm * rn);
}

/// `C += X W` on f32 lanes with 512-bit FMAs.
///
/// # Safety
/// The CPU must have AVX-512 F ([`has_avx512`]).
pub unsafe fn f32_12x32(w: &[u8], x: &[u8], groups: usize, c: &mut [f32]) {
    check_12x32(w, x, groups, c);
    // SAFETY: the lengths were checked: the block reads `groups` groups of 128 weight bytes
    // and 48 input bytes and reads and writes the 384 f32 of C, all with unaligned moves;
    // the caller guarantees AVX-512 F. The vector registers it writes are declared
    // clobbered (zmm16-31: see the module doc).
    unsafe { f32_12x32_raw(w.as_ptr(), x.as_ptr(), groups, c.as_mut_ptr()) }
}

#[inline(never)]
unsafe fn f32_12x32_raw(w: *const u8, x: *const u8, groups: usize, c: *mut f32) {
    // SAFETY: as in `f32_12x32`, whose checks cover every access.
    unsafe { tile_12x32!("vbroadcastss", "vfmadd231ps", w, x, groups, c) }
}

/// `C += X W` on bf16 pairs with `vdpbf16ps` (each f32 lane adds two exact bf16 products).
///
/// # Safety
/// The CPU must have AVX-512 BF16 ([`has_avx512_bf16`]).
pub unsafe fn bf16_12x32(w: &[u8], x: &[u8], groups: usize, c: &mut [f32]) {
    check_12x32(w, x, groups, c);
    // SAFETY: as in `f32_12x32`; the caller guarantees AVX-512 BF16.
    unsafe { bf16_12x32_raw(w.as_ptr(), x.as_ptr(), groups, c.as_mut_ptr()) }
}

#[inline(never)]
unsafe fn bf16_12x32_raw(w: *const u8, x: *const u8, groups: usize, c: *mut f32) {
    // SAFETY: as in `bf16_12x32`, whose checks cover every access.
    unsafe { tile_12x32!("vpbroadcastd", "vdpbf16ps", w, x, groups, c) }
}

/// One input row of a Q8 group: its 4 quants broadcast into zmm26, `vpdpbusd` with the
/// two weight vectors into the row's integer accumulators.
#[rustfmt::skip]
macro_rules! q8_row {
    ($a:literal, $b:literal, $xo:literal) => {
        concat!(
            "vpbroadcastd zmm26, dword ptr [{x} + ", $xo, "]\n",
            "vpdpbusd zmm", $a, ", zmm24, zmm26\n",
            "vpdpbusd zmm", $b, ", zmm25, zmm26"
        )
    };
}

/// A row's integer accumulators start at its block's correction (`-128 * sum(q_x)`).
#[rustfmt::skip]
macro_rules! q8_init {
    ($a:literal, $b:literal, $o:literal) => {
        concat!(
            "vpbroadcastd zmm", $a, ", dword ptr [{corr} + ", $o, "]\n",
            "vmovdqa64 zmm", $b, ", zmm", $a
        )
    };
}

/// A row's block sums to f32, times `d_w * d_x`, added to its f32 accumulators.
#[rustfmt::skip]
macro_rules! q8_scale {
    ($a:literal, $b:literal, $fa:literal, $fb:literal, $o:literal) => {
        concat!(
            "vbroadcastss zmm26, dword ptr [{dx} + ", $o, "]\n",
            "vmulps zmm27, zmm24, zmm26\n",
            "vmulps zmm28, zmm25, zmm26\n",
            "vcvtdq2ps zmm", $a, ", zmm", $a, "\n",
            "vcvtdq2ps zmm", $b, ", zmm", $b, "\n",
            "vfmadd231ps zmm", $fa, ", zmm", $a, ", zmm27\n",
            "vfmadd231ps zmm", $fb, ", zmm", $b, ", zmm28"
        )
    };
}

/// `C += X W` on Q8 quads with `vpdpbusd`: per block of 32 values, each of the 6 x 32
/// exact integer sums (weights as unsigned `q_w + 128`, inputs signed, the `128 * sum(q_x)`
/// this adds taken back by starting at `corr`), converted to f32 and added times
/// `d_w * d_x`. `blocks` blocks; `dw` holds 32 weight scales per block, `dx` and `corr`
/// 6 input scales and corrections per block.
///
/// # Safety
/// The CPU must have AVX-512 VNNI ([`has_avx512_vnni`]).
pub unsafe fn q8_6x32(
    w: &[u8],
    x: &[u8],
    blocks: usize,
    c: &mut [f32],
    dw: &[f32],
    dx: &[f32],
    corr: &[i32],
) {
    let (rm, rn) = Q8_512_TILE;
    let groups = blocks * 8;
    assert!(
        w.len() >= groups * rn * 4
            && x.len() >= groups * rm * 4
            && c.len() >= rm * rn
            && dw.len() >= blocks * rn
            && dx.len() >= blocks * rm
            && corr.len() >= blocks * rm
    );
    // SAFETY: the lengths were checked: per block the block reads 8 groups of 128 weight
    // bytes and 24 input bytes, 32 weight scales, 6 input scales and 6 corrections, and it
    // reads and writes the 192 f32 of C, all with unaligned moves; the caller guarantees
    // AVX-512 VNNI.
    unsafe {
        q8_6x32_raw(
            w.as_ptr(),
            x.as_ptr(),
            blocks,
            c.as_mut_ptr(),
            dw.as_ptr(),
            dx.as_ptr(),
            corr.as_ptr(),
        )
    }
}

#[inline(never)]
unsafe fn q8_6x32_raw(
    w: *const u8,
    x: *const u8,
    blocks: usize,
    c: *mut f32,
    dw: *const f32,
    dx: *const f32,
    corr: *const i32,
) {
    // SAFETY: as in `q8_6x32`, whose checks cover every access. f32 accumulators in
    // zmm12-23, integer ones in zmm0-11, weights in zmm24-25, temporaries zmm26-28.
    unsafe {
        asm!(
            load_c!(12, 0), load_c!(13, 64), load_c!(14, 128), load_c!(15, 192),
            load_c!(16, 256), load_c!(17, 320), load_c!(18, 384), load_c!(19, 448),
            load_c!(20, 512), load_c!(21, 576), load_c!(22, 640), load_c!(23, 704),
            "test {nb}, {nb}",
            "jz 3f",
            "2:",
            q8_init!(0, 1, 0), q8_init!(2, 3, 4), q8_init!(4, 5, 8),
            q8_init!(6, 7, 12), q8_init!(8, 9, 16), q8_init!(10, 11, 20),
            "mov {g:e}, 8",
            "4:",
            "vmovdqu64 zmm24, zmmword ptr [{w}]",
            "vmovdqu64 zmm25, zmmword ptr [{w} + 64]",
            q8_row!(0, 1, 0), q8_row!(2, 3, 4), q8_row!(4, 5, 8),
            q8_row!(6, 7, 12), q8_row!(8, 9, 16), q8_row!(10, 11, 20),
            "add {w}, 128",
            "add {x}, 24",
            "dec {g:e}",
            "jnz 4b",
            "vmovups zmm24, zmmword ptr [{dw}]",
            "vmovups zmm25, zmmword ptr [{dw} + 64]",
            q8_scale!(0, 1, 12, 13, 0), q8_scale!(2, 3, 14, 15, 4),
            q8_scale!(4, 5, 16, 17, 8), q8_scale!(6, 7, 18, 19, 12),
            q8_scale!(8, 9, 20, 21, 16), q8_scale!(10, 11, 22, 23, 20),
            "add {dw}, 128",
            "add {dx}, 24",
            "add {corr}, 24",
            "dec {nb}",
            "jnz 2b",
            "3:",
            store_c!(12, 0), store_c!(13, 64), store_c!(14, 128), store_c!(15, 192),
            store_c!(16, 256), store_c!(17, 320), store_c!(18, 384), store_c!(19, 448),
            store_c!(20, 512), store_c!(21, 576), store_c!(22, 640), store_c!(23, 704),
            "vzeroupper",
            w = inout(reg) w => _,
            x = inout(reg) x => _,
            nb = inout(reg) blocks => _,
            g = out(reg) _,
            c = in(reg) c,
            dw = inout(reg) dw => _,
            dx = inout(reg) dx => _,
            corr = inout(reg) corr => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        )
    }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA (intrinsics)
// ---------------------------------------------------------------------------------------

/// Tile rows and outputs of the AVX2 f32 kernel.
pub const F32_256_TILE: (usize, usize) = (6, 16);
/// Tile rows and outputs of the AVX2 Q8 kernel.
pub const Q8_256_TILE: (usize, usize) = (4, 8);

/// `C += X W` on f32 lanes with 256-bit FMAs: 6 rows x 16 outputs in 12 registers.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`has_avx2_fma`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn f32_6x16(w: &[u8], x: &[u8], groups: usize, c: &mut [f32]) {
    const RM: usize = F32_256_TILE.0;
    assert!(w.len() >= groups * 64 && x.len() >= groups * RM * 4 && c.len() >= RM * 16);
    let (wp, xp, cp) = (
        w.as_ptr() as *const f32,
        x.as_ptr() as *const f32,
        c.as_mut_ptr(),
    );
    let mut acc = [[_mm256_setzero_ps(); 2]; RM];
    for (r, a) in acc.iter_mut().enumerate() {
        // SAFETY: C holds 6 x 16 f32 (checked); unaligned loads.
        unsafe {
            a[0] = _mm256_loadu_ps(cp.add(r * 16));
            a[1] = _mm256_loadu_ps(cp.add(r * 16 + 8));
        }
    }
    for g in 0..groups {
        // SAFETY: group g's 16 weights and 6 inputs lie inside the checked lengths;
        // unaligned loads (the inputs' f32 may sit at any 4-byte offset).
        unsafe {
            let w0 = _mm256_loadu_ps(wp.add(g * 16));
            let w1 = _mm256_loadu_ps(wp.add(g * 16 + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = _mm256_set1_ps(xp.add(g * RM + r).read_unaligned());
                a[0] = _mm256_fmadd_ps(w0, xb, a[0]);
                a[1] = _mm256_fmadd_ps(w1, xb, a[1]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: as for the loads of C.
        unsafe {
            _mm256_storeu_ps(cp.add(r * 16), a[0]);
            _mm256_storeu_ps(cp.add(r * 16 + 8), a[1]);
        }
    }
}

/// `C += X W` on Q8 pairs (two `i16` per lane) with `vpmaddwd`: per block of 32 values
/// (16 groups) the 4 x 8 exact integer sums, converted to f32 and added times `d_w * d_x`.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`has_avx2_fma`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8_4x8(w: &[u8], x: &[u8], blocks: usize, c: &mut [f32], dw: &[f32], dx: &[f32]) {
    const RM: usize = Q8_256_TILE.0;
    let groups = blocks * 16;
    assert!(
        w.len() >= groups * 32
            && x.len() >= groups * RM * 4
            && c.len() >= RM * 8
            && dw.len() >= blocks * 8
            && dx.len() >= blocks * RM
    );
    let (wp, xp, cp) = (w.as_ptr(), x.as_ptr(), c.as_mut_ptr());
    let mut acc = [_mm256_setzero_ps(); RM];
    for (r, a) in acc.iter_mut().enumerate() {
        // SAFETY: C holds 4 x 8 f32 (checked).
        *a = unsafe { _mm256_loadu_ps(cp.add(r * 8)) };
    }
    for b in 0..blocks {
        let mut sums = [_mm256_setzero_si256(); RM];
        for g in b * 16..(b + 1) * 16 {
            // SAFETY: group g's 32 weight bytes and 4 x 4 input bytes lie inside the
            // checked lengths; unaligned loads.
            unsafe {
                let wv = _mm256_loadu_si256(wp.add(g * 32) as *const __m256i);
                for (r, s) in sums.iter_mut().enumerate() {
                    let xv = (xp.add((g * RM + r) * 4) as *const i32).read_unaligned();
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(wv, _mm256_set1_epi32(xv)));
                }
            }
        }
        // SAFETY: block b's 8 weight scales lie inside `dw` (checked).
        let dwv = unsafe { _mm256_loadu_ps(dw.as_ptr().add(b * 8)) };
        for (r, (a, s)) in acc.iter_mut().zip(sums).enumerate() {
            let scale = _mm256_mul_ps(dwv, _mm256_set1_ps(dx[b * RM + r]));
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *a);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: as for the loads of C.
        unsafe { _mm256_storeu_ps(cp.add(r * 8), *a) };
    }
}

/// Transposes 8 x 8 32-bit lanes: `v[i]`'s lane `j` becomes lane `i` of the result's `j`.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let f = v.map(|x| _mm256_castsi256_ps(x));
    let t0 = _mm256_unpacklo_ps(f[0], f[1]);
    let t1 = _mm256_unpackhi_ps(f[0], f[1]);
    let t2 = _mm256_unpacklo_ps(f[2], f[3]);
    let t3 = _mm256_unpackhi_ps(f[2], f[3]);
    let t4 = _mm256_unpacklo_ps(f[4], f[5]);
    let t5 = _mm256_unpackhi_ps(f[4], f[5]);
    let t6 = _mm256_unpacklo_ps(f[6], f[7]);
    let t7 = _mm256_unpackhi_ps(f[6], f[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
    .map(|x| _mm256_castps_si256(x))
}

/// The upper 16 bits of each of the 16 lanes of `a` (values 0-7) and `b` (values 8-15),
/// paired: lane `g` of the result is value `2g`'s in its low half and `2g + 1`'s in its high
/// half (a bf16 pair).
#[inline]
#[target_feature(enable = "avx2")]
fn pair_high_halves(a: __m256i, b: __m256i) -> __m256i {
    // Per 128-bit lane: bytes 2-3 and 6-7 of each pair of lanes, into the lane's low 8 bytes.
    let pick = _mm256_setr_epi8(
        2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14, 15, -1,
        -1, -1, -1, -1, -1, -1, -1,
    );
    let pa = _mm256_shuffle_epi8(a, pick);
    let pb = _mm256_shuffle_epi8(b, pick);
    // 64-bit lanes: [a01, b01, a23, b23] -> [a01, a23, b01, b23] (pairs 0-1, 2-3, 4-5, 6-7).
    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_unpacklo_epi64(pa, pb))
}

/// Packs 8 input rows x 32 values (`rows[i]`: 32 f32 of row `i`) into the AMX kernel's B
/// layout: lane `base + 16 g + i` of each part for pair `g` (values `2g, 2g + 1`) of row `i`.
/// With three parts, each value split into its three truncated bf16 parts exactly as
/// `split3` splits it (a value that is not finite: its bits in the first part, the others
/// zero); with one, rounded to bf16 to nearest even as `half::bf16::from_f32` rounds
/// (NaNs stay NaN).
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn pack_amx_8x32(rows: [&[f32]; 8], parts: &mut [&mut [u32]], base: usize) {
    assert!(rows.iter().all(|r| r.len() >= 32));
    assert!(parts.iter().all(|p| p.len() >= base + 16 * 15 + 8));
    let three = parts.len() == 3;
    let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let exp = _mm256_set1_epi32(0x7F80_0000);
    // Per part, per row: the 16 pairs in two vectors (pairs 0-7, 8-15).
    let mut packed = [[[_mm256_setzero_si256(); 2]; 8]; 3];
    for (i, row) in rows.iter().enumerate() {
        let mut v = [_mm256_setzero_si256(); 4];
        for (q, vq) in v.iter_mut().enumerate() {
            // SAFETY: the row holds 32 values (asserted); an unaligned load of 8 of them.
            *vq = unsafe { _mm256_loadu_si256(row.as_ptr().add(8 * q) as *const __m256i) };
        }
        let mut out = [[_mm256_setzero_si256(); 4]; 3];
        for q in 0..4 {
            let bits = v[q];
            // Not finite: every exponent bit set.
            let odd = _mm256_cmpeq_epi32(_mm256_and_si256(bits, exp), exp);
            if three {
                let h = _mm256_and_si256(bits, top);
                let r = _mm256_sub_ps(_mm256_castsi256_ps(bits), _mm256_castsi256_ps(h));
                let m = _mm256_and_si256(_mm256_castps_si256(r), top);
                let l = _mm256_sub_ps(r, _mm256_castsi256_ps(m));
                out[0][q] = h;
                out[1][q] = _mm256_andnot_si256(odd, m);
                out[2][q] = _mm256_andnot_si256(odd, _mm256_castps_si256(l));
            } else {
                // Round to nearest even: add 0x7FFF plus the kept part's lowest bit.
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
                let rounded =
                    _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
                // A NaN keeps its sign and upper bits, made quiet (as `half` does).
                let nan = _mm256_andnot_si256(
                    _mm256_cmpeq_epi32(
                        _mm256_and_si256(bits, _mm256_set1_epi32(0x007F_FFFF)),
                        _mm256_setzero_si256(),
                    ),
                    odd,
                );
                let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
                out[0][q] = _mm256_blendv_epi8(rounded, quiet, nan);
            }
        }
        for p in 0..if three { 3 } else { 1 } {
            packed[p][i][0] = pair_high_halves(out[p][0], out[p][1]);
            packed[p][i][1] = pair_high_halves(out[p][2], out[p][3]);
        }
    }
    for (p, part) in parts.iter_mut().enumerate().take(if three { 3 } else { 1 }) {
        for half in 0..2 {
            let by_pair = transpose8(packed[p].map(|r| r[half]));
            for (g, lanes) in by_pair.iter().enumerate() {
                let at = base + 16 * (8 * half + g);
                // SAFETY: lanes `at..at + 8` lie inside the part (asserted: the largest `at`
                // is base + 16 * 15); an unaligned store.
                unsafe { _mm256_storeu_si256(part.as_mut_ptr().add(at) as *mut __m256i, *lanes) };
            }
        }
    }
}
