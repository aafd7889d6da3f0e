//! Veil's kernels (`kernels.cu`) and the few raw CUDA resources the device evaluation owns:
//! device buffers that report an allocation failure instead of aborting, and page-locked
//! host buffers.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::marker::PhantomData;

use crate::error::{Result, RuntimeError};

unsafe extern "C" {
    fn veil_linear_async(
        stream: *mut c_void,
        out: *mut u64,
        blocks: *const *const u64,
        block_len: *const u32,
        row_start: *const u32,
        terms: *const c_void,
        offset: *const u64,
        body_fix: u64,
        n_out: u32,
        samples: u32,
        lwe_size: u32,
    ) -> c_int;
    fn veil_fill_index_async(
        stream: *mut c_void,
        out: *mut u64,
        n: u64,
        map: *const u64,
        modulo: u64,
    ) -> c_int;
    fn veil_device_alloc(bytes: u64, stream: *mut c_void) -> *mut c_void;
    fn veil_device_free(ptr: *mut c_void, stream: *mut c_void);
    fn veil_host_alloc(bytes: u64) -> *mut c_void;
    fn veil_host_free(ptr: *mut c_void);
    fn veil_mem_get_info(gpu_index: u32, free: *mut u64, total: *mut u64) -> c_int;
    fn veil_stream_sync(stream: *mut c_void) -> c_int;
    fn veil_memcpy_async(
        dst: *mut c_void,
        src: *const c_void,
        bytes: u64,
        stream: *mut c_void,
    ) -> c_int;
    fn veil_error_string(code: c_int) -> *const c_char;
}

pub(crate) fn check(code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static, NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(veil_error_string(code)) };
    Err(RuntimeError::Backend(format!(
        "CUDA error in {what}: {} ({code})",
        msg.to_string_lossy()
    )))
}

/// Free and total device memory, in bytes.
pub(crate) fn mem_info(gpu: u32) -> Result<(u64, u64)> {
    let (mut free, mut total) = (0u64, 0u64);
    // SAFETY: both pointers are valid for one write.
    check(
        unsafe { veil_mem_get_info(gpu, &mut free, &mut total) },
        "cudaMemGetInfo",
    )?;
    Ok((free, total))
}

/// Waits for everything queued on `stream`; reports the first error a kernel met.
pub(crate) fn sync(stream: *mut c_void) -> Result<()> {
    // SAFETY: `stream` is a live stream of this process.
    check(unsafe { veil_stream_sync(stream) }, "a device evaluation")
}

/// A device allocation made on one stream (stream-ordered: freed on that stream too).
pub(crate) struct DeviceBuf<T> {
    ptr: *mut c_void,
    len: usize,
    stream: *mut c_void,
    _t: PhantomData<T>,
}

// SAFETY: the buffer is plain device memory; the stream handle is only used to order the
// free, and every user synchronizes its stream before handing the buffer on.
unsafe impl<T> Send for DeviceBuf<T> {}
unsafe impl<T> Sync for DeviceBuf<T> {}

impl<T: Copy> DeviceBuf<T> {
    /// `len` elements, uninitialised; an error (never an abort) when the device is full.
    pub(crate) fn new(len: usize, stream: *mut c_void) -> Result<Self> {
        let bytes = (len.max(1) * size_of::<T>()) as u64;
        // SAFETY: plain allocation; a null result is handled below.
        let ptr = unsafe { veil_device_alloc(bytes, stream) };
        if ptr.is_null() {
            return Err(RuntimeError::Backend(format!(
                "the GPU has no room for {bytes} more bytes"
            )));
        }
        Ok(DeviceBuf {
            ptr,
            len,
            stream,
            _t: PhantomData,
        })
    }

    /// A device copy of `host`, complete when this returns.
    pub(crate) fn from_host(host: &[T], stream: *mut c_void) -> Result<Self> {
        let mut buf = Self::new(host.len(), stream)?;
        buf.upload(host, 0)?;
        sync(stream)?;
        Ok(buf)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn ptr(&self) -> *mut T {
        self.ptr.cast()
    }

    /// Element `i`'s address (pointer arithmetic only; nothing is read).
    pub(crate) fn at(&self, i: usize) -> *mut T {
        debug_assert!(i <= self.len);
        self.ptr.cast::<T>().wrapping_add(i)
    }

    /// Queues a copy of `host` to elements `at..`. The caller keeps `host` alive and
    /// unmodified until the stream is synchronized.
    pub(crate) fn upload(&mut self, host: &[T], at: usize) -> Result<()> {
        assert!(at + host.len() <= self.len, "upload past the buffer's end");
        // SAFETY: the destination range lies inside this allocation (checked above).
        check(
            unsafe {
                veil_memcpy_async(
                    self.at(at).cast(),
                    host.as_ptr().cast(),
                    size_of_val(host) as u64,
                    self.stream,
                )
            },
            "a host-to-device copy",
        )
    }

    /// Queues a copy of elements `at..at + host.len()` into `host`; the caller synchronizes
    /// the stream before reading `host`.
    pub(crate) fn download(&self, at: usize, host: &mut [T]) -> Result<()> {
        assert!(
            at + host.len() <= self.len,
            "download past the buffer's end"
        );
        // SAFETY: the source range lies inside this allocation (checked above).
        check(
            unsafe {
                veil_memcpy_async(
                    host.as_mut_ptr().cast(),
                    self.at(at).cast_const().cast(),
                    size_of_val(host) as u64,
                    self.stream,
                )
            },
            "a device-to-host copy",
        )
    }
}

impl<T> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by veil_device_alloc on this stream, freed once.
        unsafe { veil_device_free(self.ptr, self.stream) }
    }
}

/// Page-locked host memory of u64 words, grown on demand and reused.
pub(crate) struct PinnedBuf {
    ptr: *mut u64,
    cap: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl Default for PinnedBuf {
    fn default() -> Self {
        PinnedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }
}

impl PinnedBuf {
    /// The first `len` words (contents unspecified), growing the buffer if needed.
    pub(crate) fn slice(&mut self, len: usize) -> Result<&mut [u64]> {
        if len > self.cap {
            self.release();
            // Grow by half again, so that slowly rising batch sizes reallocate rarely.
            let cap = len.max(self.cap + self.cap / 2);
            // SAFETY: plain allocation; null is handled below.
            let ptr = unsafe { veil_host_alloc((cap * 8) as u64) }.cast::<u64>();
            if ptr.is_null() {
                return Err(RuntimeError::Backend(format!(
                    "no page-locked host memory for {} bytes",
                    cap * 8
                )));
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: `ptr` holds `cap >= len` words owned by this value. u64 has no invalid
        // bit patterns, so unspecified contents are sound to read.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by veil_host_alloc, freed once.
            unsafe { veil_host_free(self.ptr.cast()) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        self.release();
    }
}

/// One term of a weighted sum, as the linear kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Term {
    pub block: u32,
    pub local: u32,
    pub weight: u64,
}

/// Arguments of one linear-layer launch; every pointer is a device pointer.
pub(crate) struct LinearLaunch {
    pub out: *mut u64,
    pub blocks: *const *const u64,
    pub block_len: *const u32,
    pub row_start: *const u32,
    pub terms: *const Term,
    pub offset: *const u64,
    pub body_fix: u64,
    pub n_out: u32,
    pub samples: u32,
    pub lwe_size: u32,
}

/// Queues `out[s][n] = sum_t w_t x[b_t][s][c_t] (+ offset[n] + body_fix on the body)`.
///
/// # Safety
/// Every pointer of `l` is a live device allocation of the sizes the layer implies.
pub(crate) unsafe fn linear(stream: *mut c_void, l: &LinearLaunch) -> Result<()> {
    check(
        unsafe {
            veil_linear_async(
                stream,
                l.out,
                l.blocks,
                l.block_len,
                l.row_start,
                l.terms.cast(),
                l.offset,
                l.body_fix,
                l.n_out,
                l.samples,
                l.lwe_size,
            )
        },
        "the linear-layer kernel",
    )
}

/// Queues `out[i] = map[i % modulo]` for `i < out.len()` (null `map`: `out[i] = i`).
///
/// # Safety
/// `map` is null or a device array of `modulo` entries.
pub(crate) unsafe fn fill_index(
    stream: *mut c_void,
    out: &DeviceBuf<u64>,
    n: usize,
    map: *const u64,
    modulo: usize,
) -> Result<()> {
    assert!(n <= out.len());
    check(
        unsafe { veil_fill_index_async(stream, out.ptr(), n as u64, map, modulo as u64) },
        "the index kernel",
    )
}
