//! A whole evaluation on the device: the inputs go up once, every linear layer and every
//! bootstrap runs on the GPU with the activations left in device memory, and only the
//! output layer's sums come back.
//!
//! A batch that would not fit in device memory runs in chunks of samples. While the device
//! works on one chunk, the host expands the next chunk's seeded inputs (regenerating their
//! masks is the one step left on the host).

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::ffi::{self, DeviceBuf, LinearLaunch, Term};
use super::{GpuBackend, GpuKey, MAX_DEVICE_BATCH, Workspace};
use crate::error::{Result, RuntimeError};
use crate::executor::{CENTERED_SWITCH_FIX, FheModel, Profile};
use crate::wire::{EncryptedInput, EncryptedOutput};
use veil_format::compiled::IntMatrix;

/// One weighted sum layer in device memory (CSR: `row_start[n]..row_start[n + 1]` are the
/// terms of output `n`).
struct DeviceLinear {
    row_start: DeviceBuf<u32>,
    terms: DeviceBuf<Term>,
    offset: Option<DeviceBuf<u64>>,
    n_out: usize,
}

/// A model's weights and lookup tables in GPU memory, shared by every key's evaluations.
pub(crate) struct DeviceModel {
    /// The stages' layers, then the output layer.
    layers: Vec<DeviceLinear>,
    /// Per stage: its distinct tables, and the table of each neuron.
    luts: Vec<DeviceBuf<u64>>,
    table_of: Vec<DeviceBuf<u64>>,
    /// Values per sample in each block.
    block_len: DeviceBuf<u32>,
}

impl DeviceModel {
    fn upload(fhe: &FheModel) -> Result<Self> {
        let null = std::ptr::null_mut();
        let b = &fhe.blocks;
        let linear = |w: &IntMatrix, offset: Option<&[u64]>| -> Result<DeviceLinear> {
            let mut row_start = Vec::with_capacity(w.n_out() + 1);
            let mut terms = Vec::new();
            row_start.push(0u32);
            for row in &w.rows {
                for &(c, wt) in row {
                    let block = b.block_of(c as usize);
                    terms.push(Term {
                        block: block as u32,
                        local: (c as usize - b.starts[block]) as u32,
                        weight: wt as u64,
                    });
                }
                row_start.push(u32::try_from(terms.len()).map_err(|_| {
                    RuntimeError::Backend("a layer has more than 2^32 weights".into())
                })?);
            }
            Ok(DeviceLinear {
                row_start: DeviceBuf::from_host(&row_start, null)?,
                terms: DeviceBuf::from_host(&terms, null)?,
                offset: offset.map(|o| DeviceBuf::from_host(o, null)).transpose()?,
                n_out: w.n_out(),
            })
        };
        let model = &fhe.model;
        let mut layers = Vec::with_capacity(model.stages.len() + 1);
        for st in &model.stages {
            layers.push(linear(&st.weights, Some(&st.offset))?);
        }
        layers.push(linear(&model.output.weights, None)?);
        let luts = fhe
            .luts
            .iter()
            .map(|l| DeviceBuf::from_host(l.host().as_ref(), null))
            .collect::<Result<_>>()?;
        let table_of = fhe
            .table_of
            .iter()
            .map(|t| {
                let t: Vec<u64> = t.iter().map(|&i| i as u64).collect();
                DeviceBuf::from_host(&t, null)
            })
            .collect::<Result<_>>()?;
        let lens: Vec<u32> = (0..b.starts.len() - 1).map(|k| b.len(k) as u32).collect();
        Ok(DeviceModel {
            layers,
            luts,
            table_of,
            block_len: DeviceBuf::from_host(&lens, null)?,
        })
    }
}

fn device_model(fhe: &FheModel) -> Result<Arc<DeviceModel>> {
    let mut slot = fhe.device.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = slot.as_ref() {
        return Ok(Arc::clone(m));
    }
    let m = Arc::new(DeviceModel::upload(fhe)?);
    *slot = Some(Arc::clone(&m));
    Ok(m)
}

/// Samples per device chunk: as many as device memory holds (after the bootstrap scratch
/// and the keyswitch buffer of a full slice), and for large batches no more than an eighth
/// of the batch, so that the host's expansion of one chunk overlaps the device's work on
/// another, but never so few that a layer stops filling the GPU.
fn chunk_samples(fhe: &FheModel, key: &GpuKey, ws: &Workspace, samples: usize) -> Result<usize> {
    // At its peak a sample holds the blocks still to be read plus one stage's sums and their
    // bootstrapped copies, on the device as on the host.
    let per_sample = fhe.working_bytes_per_sample();
    let widest = fhe.model.stages.iter().map(|s| s.len()).max().unwrap_or(0);
    let slice = (samples * widest).clamp(1, MAX_DEVICE_BATCH);
    let capacity = slice.next_power_of_two().min(MAX_DEVICE_BATCH);
    let scratch = if ws.scratch.contains_key(&capacity) {
        0
    } else {
        key.scratch_bytes(ws, capacity)
    };
    let fixed = scratch + (slice * key.dims.small_size() * 8) as u64 + (256 << 20);
    let pooled: u64 = ws.pool.iter().map(|b| b.len() as u64 * 8).sum();
    let (free, _) = super::device_memory()?;
    let avail = (free + pooled).saturating_sub(fixed);
    let fits = (avail / per_sample.max(1)) as usize;
    if fits == 0 {
        return Err(RuntimeError::Backend(format!(
            "one sample of this model needs {per_sample} bytes of GPU memory besides \
             {fixed} of scratch; {} are free",
            free + pooled
        )));
    }
    // A layer of 16,384 bootstraps already runs at the GPU's full rate (BENCHMARKS.md).
    let full_gpu = (16_384usize).div_ceil(widest.max(1));
    let target = if samples >= 2 * full_gpu {
        samples.div_ceil(8).max(full_gpu)
    } else {
        samples
    };
    Ok(target.min(fits).min(super::chunk_limit()).max(1))
}

/// Evaluates `batch` on the GPU: the outputs the host path would give.
pub(crate) fn evaluate(
    fhe: &FheModel,
    gpu: &GpuBackend<'_>,
    batch: &[EncryptedInput],
    profile: &mut Profile,
) -> Result<Vec<EncryptedOutput>> {
    let key = gpu.key();
    let dm = device_model(fhe)?;
    let size = fhe.lwe_size;
    let per_sample_in = fhe.model.n_inputs() * size;
    gpu.with_workspace(|ws, phase| {
        let chunk = chunk_samples(fhe, key, ws, batch.len())?;
        let chunks: Vec<&[EncryptedInput]> = batch.chunks(chunk).collect();
        let mut out = Vec::with_capacity(batch.len());
        let mut pinned = std::mem::take(&mut ws.pinned);
        let expand = |dst: &mut [u64], part: &[EncryptedInput]| -> f64 {
            let t = Instant::now();
            dst.par_chunks_mut(per_sample_in)
                .zip(part.par_iter())
                .for_each(|(d, s)| s.expand_into(d));
            t.elapsed().as_secs_f64()
        };
        let result = (|| -> Result<()> {
            profile.expand_s +=
                expand(pinned[0].slice(chunks[0].len() * per_sample_in)?, chunks[0]);
            for (i, part) in chunks.iter().enumerate() {
                let [a, b] = &mut pinned;
                let (cur, next) = if i % 2 == 0 { (a, b) } else { (b, a) };
                let x = cur.slice(part.len() * per_sample_in)?;
                let following = chunks.get(i + 1);
                let next_dst = match following {
                    Some(p) => Some(next.slice(p.len() * per_sample_in)?),
                    None => None,
                };
                // The device work gets a thread of its own (it mostly waits on the GPU): as
                // a rayon task it would only start once the expansion freed a worker.
                let (expanded, ran) = std::thread::scope(|s| {
                    let device =
                        s.spawn(|| run_chunk(fhe, &dm, key, ws, x, part.len(), phase, profile));
                    let expanded = match (next_dst, following) {
                        (Some(d), Some(p)) => expand(d, p),
                        _ => 0.0,
                    };
                    let ran = device.join().unwrap_or_else(|_| {
                        Err(RuntimeError::Backend(
                            "the device evaluation thread panicked".into(),
                        ))
                    });
                    (expanded, ran)
                });
                profile.expand_s += expanded;
                out.extend(ran?);
            }
            Ok(())
        })();
        ws.pinned = pinned;
        result?;
        profile.bootstrap_s += phase[1] + phase[2];
        Ok(out)
    })
}

/// One chunk of samples, start to end on the device; `x` holds its expanded inputs (in
/// page-locked memory).
#[allow(clippy::too_many_arguments)]
fn run_chunk(
    fhe: &FheModel,
    dm: &DeviceModel,
    key: &GpuKey,
    ws: &mut Workspace,
    x: &[u64],
    samples: usize,
    phase: &mut [f64; 4],
    profile: &mut Profile,
) -> Result<Vec<EncryptedOutput>> {
    let size = fhe.lwe_size;
    let b = &fhe.blocks;
    let n_blocks = b.starts.len() - 1;
    let mut t = Instant::now();
    let mut blocks: Vec<Option<DeviceBuf<u64>>> = Vec::with_capacity(n_blocks);
    let mut input = ws.buffer(x.len())?;
    input.upload(x, 0)?;
    blocks.push(Some(input));
    let mut ptrs = ws.buffer(n_blocks)?;
    ws.sync()?;
    phase[0] += lap(&mut t);
    let mut outputs = Vec::new();
    let result = (|| -> Result<()> {
        for (step, layer) in dm.layers.iter().enumerate() {
            let n_out = layer.n_out;
            let is_output = step == fhe.model.stages.len();
            let acc = ws.buffer(samples * n_out * size)?;
            // The kernel finds each block through this table of device addresses.
            let addr: Vec<u64> = (0..n_blocks)
                .map(|k| {
                    blocks
                        .get(k)
                        .and_then(|b| b.as_ref())
                        .map_or(0, |b| b.ptr() as u64)
                })
                .collect();
            // `addr` lives until the synchronization after the launch.
            ptrs.upload(&addr, 0)?;
            let launch = LinearLaunch {
                out: acc.ptr(),
                blocks: ptrs.ptr().cast_const().cast(),
                block_len: dm.block_len.ptr().cast_const(),
                row_start: layer.row_start.ptr().cast_const(),
                terms: layer.terms.ptr().cast_const(),
                offset: layer
                    .offset
                    .as_ref()
                    .map_or(std::ptr::null(), |o| o.ptr().cast_const()),
                body_fix: if is_output { 0 } else { CENTERED_SWITCH_FIX },
                n_out: n_out as u32,
                samples: samples as u32,
                lwe_size: size as u32,
            };
            // SAFETY: every block the layer reads is live (a block is dropped only after its
            // last reader), `acc` holds samples x n_out ciphertexts, and the model's arrays
            // were uploaded for these very layers.
            unsafe { ffi::linear(ws.stream(), &launch)? };
            ws.sync()?;
            profile.linear_s += lap(&mut t);
            if is_output {
                let stream = ws.stream();
                let staging = ws.pinned_out.slice(samples * n_out * size)?;
                acc.download(0, staging)?;
                ffi::sync(stream)?;
                outputs = fhe.outputs(staging)?;
                phase[3] += lap(&mut t);
                ws.give_back(acc);
                break;
            }
            for (k, slot) in blocks.iter_mut().enumerate() {
                if b.last_read[k] <= step
                    && let Some(buf) = slot.take()
                {
                    ws.give_back(buf);
                }
            }
            let n = samples * n_out;
            let next = ws.buffer(n * size)?;
            let tables = &dm.table_of[step];
            let lut_index = ws.lut_index(n, tables.ptr(), n_out)?;
            let r = ws.keyswitch_bootstrap(
                key,
                acc.ptr(),
                next.ptr(),
                n,
                dm.luts[step].ptr(),
                lut_index,
                phase,
            );
            ws.give_back(acc);
            blocks.push(Some(next));
            r?;
            profile.bootstraps += n;
            t = Instant::now();
        }
        Ok(())
    })();
    for buf in blocks.into_iter().flatten() {
        ws.give_back(buf);
    }
    ws.give_back(ptrs);
    result.map(|()| outputs)
}

fn lap(t: &mut Instant) -> f64 {
    let s = t.elapsed().as_secs_f64();
    *t = Instant::now();
    s
}
