//! Exact discrete noise for differential privacy.
//!
//! Samplers after Canonne, Kamath and Steinke, "The Discrete Gaussian for
//! Differential Privacy" (2020): Bernoulli(exp(-x)) for rational x by
//! rejection with only integer arithmetic, on top of it the discrete Laplace
//! and the discrete Gaussian. No floating point touches a sample, so none of
//! the attacks on textbook floating-point Laplace (Mironov 2012) apply.
//! Randomness is a ChaCha20 keystream under a key from the OS CSPRNG
//! (ring's `SystemRandom`), redrawn every megabyte ([`SecureUniform`]).
//!
//! Why written here rather than taken from a crate: `opendp` pulls a large
//! dependency tree (and its samplers expect its own RNG plumbing), `prio`'s
//! samplers are tied to its VDAF types; the algorithms themselves are
//! short, and this module is the product.
//!
//! Sampling time depends on the value drawn, so answers never wait on a
//! draw: [`take`] serves pre-drawn samples per scale (per thread) in
//! constant time.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{HashMap, VecDeque};

/// A source of uniform random integers.
pub trait Uniform {
    /// Uniform in `[0, n)`, n ≥ 1.
    fn below(&mut self, n: u128) -> u128;
}

/// A cryptographically secure source, with rejection sampling so every
/// value is equally likely. Each byte is used once.
///
/// The bytes are a ChaCha20 keystream under a 256-bit key drawn from the
/// OS, redrawn every [`RESEED_BLOCKS`] blocks: the construction of the
/// kernel's own `getrandom`, whose generic C ChaCha took a tenth of a large
/// DP release, run in user space by ring's vectorised ChaCha (ring's
/// ChaCha20-Poly1305 sealing zeros, a fresh nonce per block, the tag
/// dropped). Without the key the stream cannot be told from uniform bytes.
pub struct SecureUniform {
    os: SystemRandom,
    key: Option<LessSafeKey>,
    /// Blocks drawn under the current key: the next block's nonce.
    blocks: u64,
    block: Box<[u8; RANDOM_BLOCK]>,
    used: usize,
}

/// Bytes drawn at once.
const RANDOM_BLOCK: usize = 16 * 1024;

/// Blocks drawn under one key (1 MiB).
const RESEED_BLOCKS: u64 = 64;

impl Default for SecureUniform {
    fn default() -> Self {
        SecureUniform {
            os: SystemRandom::new(),
            key: None,
            blocks: 0,
            block: Box::new([0u8; RANDOM_BLOCK]),
            used: RANDOM_BLOCK,
        }
    }
}

impl SecureUniform {
    fn refill(&mut self) {
        if self.blocks == RESEED_BLOCKS {
            self.key = None;
        }
        let key = self.key.get_or_insert_with(|| {
            let mut bytes = [0u8; 32];
            // The OS entropy source does not fail on Linux once booted; a
            // failure here means no safe noise can be drawn at all.
            self.os
                .fill(&mut bytes)
                .expect("OS random source available");
            self.blocks = 0;
            let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("a 32-byte key");
            LessSafeKey::new(key)
        });
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.blocks.to_le_bytes());
        self.blocks += 1;
        self.block.fill(0);
        // Sealing fails only for inputs of hundreds of gigabytes. The tag
        // authenticates nothing here.
        let _tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut self.block[..],
            )
            .expect("a block within ChaCha20's length limit");
        self.used = 0;
    }

    fn next_bytes<const N: usize>(&mut self) -> [u8; N] {
        if self.used + N > self.block.len() {
            self.refill();
        }
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(&self.block[self.used..self.used + N]);
        self.used += N;
        bytes
    }

    /// Uniform in `[0, n)` from `N` random bytes, n < 2^(8N), by Lemire's
    /// multiply-and-shift: no division but on the rare draws that must be
    /// checked for rejection. The high part of x·n is uniform once the low
    /// part avoids its first 2^(8N) mod n values.
    fn multiply_shift<const N: usize>(&mut self, n: u64) -> u128 {
        let bits = 8 * N as u32;
        let low = (1u128 << bits) - 1;
        let n = u128::from(n);
        let mut draw = || {
            let mut x = [0u8; 8];
            x[..N].copy_from_slice(&self.next_bytes::<N>());
            u128::from(u64::from_le_bytes(x)) * n
        };
        let mut m = draw();
        if m & low < n {
            let reject_below = ((1u128 << bits) - n) % n;
            while m & low < reject_below {
                m = draw();
            }
        }
        m >> bits
    }
}

impl Uniform for SecureUniform {
    fn below(&mut self, n: u128) -> u128 {
        debug_assert!(n >= 1);
        if n <= 1 {
            return 0;
        }
        // The bounds the samplers use fit in 32 bits: 4 random bytes.
        if let Ok(n) = u32::try_from(n) {
            return self.multiply_shift::<4>(u64::from(n));
        }
        if let Ok(n) = u64::try_from(n) {
            return self.multiply_shift::<8>(n);
        }
        // Values at or above the largest multiple of n that fits are
        // rejected.
        let zone = u128::MAX - (u128::MAX % n);
        loop {
            let x = u128::from_le_bytes(self.next_bytes());
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Bernoulli(num/den).
fn bernoulli(rng: &mut impl Uniform, num: u128, den: u128) -> bool {
    rng.below(den) < num
}

/// Bernoulli(exp(-num/den)) for num/den in [0, 1].
fn bernoulli_exp_small(rng: &mut impl Uniform, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    loop {
        // Bernoulli(gamma / k)
        if bernoulli(rng, num, den * k) {
            k += 1;
        } else {
            return k % 2 == 1;
        }
    }
}

/// Bernoulli(exp(-num/den)) for any num/den ≥ 0.
pub fn bernoulli_exp(rng: &mut impl Uniform, num: u128, den: u128) -> bool {
    // 64-bit division where it fits: the 128-bit one is a library call.
    let whole = match (u64::try_from(num), u64::try_from(den)) {
        (Ok(num), Ok(den)) => u128::from(num / den),
        _ => num / den,
    };
    for _ in 0..whole {
        if !bernoulli_exp_small(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp_small(rng, num - whole * den, den)
}

/// Discrete Laplace with scale `num/den`: P(x) ∝ exp(-|x|·den/num).
/// (CKS Algorithm 2, whose output DLap(t/s) takes t = num, s = den.)
pub fn discrete_laplace(rng: &mut impl Uniform, num: u128, den: u128) -> i64 {
    let (t, s) = (num.max(1), den.max(1));
    loop {
        let u = rng.below(t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let x = u + t * v;
        let y = x / s;
        let negative = bernoulli(rng, 1, 2);
        if negative && y == 0 {
            continue;
        }
        let y = i64::try_from(y).unwrap_or(i64::MAX);
        return if negative { -y } else { y };
    }
}

/// Discrete Gaussian with variance `sigma2_num / sigma2_den`. (CKS Algorithm 3.)
pub fn discrete_gaussian(rng: &mut impl Uniform, sigma2_num: u128, sigma2_den: u128) -> i64 {
    // t = floor(sigma) + 1, with sigma = sqrt(sigma2) computed exactly on integers.
    let t = isqrt(sigma2_num / sigma2_den) + 1;
    // Callers keep sigma small enough for 128-bit arithmetic; should a draw
    // land so far in the tail that it overflows anyway, it is rejected, and
    // this bound keeps even that from looping without end.
    let mut overflows = 0u32;
    loop {
        let y = discrete_laplace(rng, t, 1);
        // Accept with probability exp(-(|y| - sigma²/t)² / (2 sigma²)):
        // (|y|·t·den - num)² / (2·num·den·t²)
        let a = (y.unsigned_abs() as u128)
            .checked_mul(t)
            .and_then(|x| x.checked_mul(sigma2_den));
        let Some(a) = a else {
            overflows += 1;
            if overflows > 10_000 {
                return y;
            }
            continue;
        };
        let diff = a.abs_diff(sigma2_num);
        let num = diff.checked_mul(diff);
        let den = sigma2_num
            .checked_mul(sigma2_den)
            .and_then(|x| x.checked_mul(2 * t * t));
        match (num, den) {
            (Some(num), Some(den)) if bernoulli_exp(rng, num, den) => return y,
            (Some(_), Some(_)) => continue,
            // Far in the tail: the acceptance probability is far below any
            // representable value; reject, but never forever.
            _ if overflows < 10_000 => {
                overflows += 1;
                continue;
            }
            _ => return y,
        }
    }
}

fn isqrt(n: u128) -> u128 {
    if n < 2 {
        return n;
    }
    let mut x = (n as f64).sqrt() as u128;
    while x * x > n {
        x -= 1;
    }
    while (x + 1) * (x + 1) <= n {
        x += 1;
    }
    x
}

/// A noise distribution, as a pool key: scales are rationals so that equal
/// scales share a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Noise {
    /// Discrete Laplace with scale num/den.
    Laplace { num: u128, den: u128 },
    /// Discrete Gaussian with variance num/den.
    Gaussian { num: u128, den: u128 },
}

impl Noise {
    /// The discrete Laplace of scale `b`, represented to 1/1000 and rounded
    /// up: a scale below the one asked for would be less noise than the
    /// privacy loss accounted for.
    pub fn laplace(b: f64) -> Noise {
        let den = 1000u128;
        let num = ((b.max(1e-3)) * den as f64).ceil() as u128;
        let g = gcd(num, den);
        Noise::Laplace {
            num: num / g,
            den: den / g,
        }
    }

    /// The discrete Gaussian of standard deviation `sigma`, its variance
    /// represented to 1/1000, rounded up like the Laplace scale.
    pub fn gaussian(sigma: f64) -> Noise {
        let den = 1000u128;
        let num = ((sigma * sigma).max(1e-3) * den as f64).ceil() as u128;
        let g = gcd(num, den);
        Noise::Gaussian {
            num: num / g,
            den: den / g,
        }
    }

    pub fn scale(&self) -> f64 {
        match *self {
            Noise::Laplace { num, den } => num as f64 / den as f64,
            Noise::Gaussian { num, den } => (num as f64 / den as f64).sqrt(),
        }
    }

    fn draw(&self, rng: &mut impl Uniform) -> i64 {
        match *self {
            Noise::Laplace { num, den } => discrete_laplace(rng, num, den),
            Noise::Gaussian { num, den } => discrete_gaussian(rng, num, den),
        }
    }

    /// Half-width of the interval holding the noise with probability `p`.
    pub fn bound(&self, p: f64) -> f64 {
        match *self {
            Noise::Laplace { .. } => self.scale() * (1.0 / (1.0 - p)).ln(),
            Noise::Gaussian { .. } => self.scale() * (2.0 * (1.0 / (1.0 - p)).ln()).sqrt(),
        }
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 { a.max(1) } else { gcd(b, a % b) }
}

/// Samples drawn at once when a pool runs dry.
const BATCH: usize = 256;

thread_local! {
    /// Pre-drawn samples per distribution, so that taking one costs the same
    /// whatever its value. A pool refills in whole batches, whose duration
    /// says nothing about which of its samples a query receives. One set of
    /// pools per thread, with its own random source: concurrent releases
    /// never wait on each other.
    static POOLS: std::cell::RefCell<(SecureUniform, HashMap<Noise, VecDeque<i64>>)> =
        Default::default();
}

/// One sample of `noise`.
pub fn take(noise: Noise) -> i64 {
    from_pool(noise, 1, |pool| pool.pop_front().unwrap_or(0))
}

/// Draws `n` samples (for tests and calibration).
/// `n` samples of `noise`, the pool found once for all of them (a release
/// of many groups spent a tenth of its noise time finding it per sample).
pub fn take_many(noise: Noise, n: usize) -> Vec<i64> {
    from_pool(noise, n, |pool| pool.drain(..n).collect())
}

/// `f` of `noise`'s pool, refilled in whole batches until it holds `n`.
fn from_pool<T>(noise: Noise, n: usize, f: impl FnOnce(&mut VecDeque<i64>) -> T) -> T {
    POOLS.with(|pools| {
        let (rng, pools) = &mut *pools.borrow_mut();
        let pool = pools.entry(noise).or_default();
        while pool.len() < n {
            pool.extend((0..BATCH).map(|_| noise.draw(rng)));
        }
        f(pool)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(noise: Noise, n: usize) -> Vec<i64> {
        let mut rng = SecureUniform::default();
        (0..n).map(|_| noise.draw(&mut rng)).collect()
    }

    fn mean_var(xs: &[i64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    /// Every block of the keystream is new, across a change of key and
    /// between two sources (a nonce or key used twice would repeat one),
    /// and its bytes are uniform.
    #[test]
    fn the_keystream_never_repeats_a_block_and_its_bytes_are_uniform() {
        let blocks = |rng: &mut SecureUniform, n: u64| {
            (0..n)
                .map(|_| {
                    rng.refill();
                    rng.block.to_vec()
                })
                .collect::<Vec<_>>()
        };
        let mut rng = SecureUniform::default();
        let mut all = blocks(&mut rng, RESEED_BLOCKS + 2);
        assert_eq!(
            rng.blocks, 2,
            "the key was redrawn after {RESEED_BLOCKS} blocks"
        );
        all.extend(blocks(&mut SecureUniform::default(), 2));
        let heads: std::collections::HashSet<&[u8]> = all.iter().map(|b| &b[..32]).collect();
        assert_eq!(heads.len(), all.len(), "a block repeated");
        let mut counts = [0f64; 256];
        for byte in all.iter().flatten() {
            counts[*byte as usize] += 1.0;
        }
        let expected = (all.len() * RANDOM_BLOCK) as f64 / 256.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        // 255 degrees of freedom: mean 255, deviation 22.6.
        assert!(chi2 < 400.0, "chi-square {chi2}");
    }

    /// Bounds that fit in 32 bits take the 32-bit path, then 64 and 128:
    /// each stays below the bound and spreads evenly over it. (Three
    /// quarters of 2^32 or 2^64, taken modulo without rejection, would draw its
    /// lowest third twice as often; multiplied and shifted without
    /// rejection, every third value.)
    #[test]
    fn uniform_values_cover_their_range_evenly_at_both_widths() {
        let mut rng = SecureUniform::default();
        let wide = 3u128 << 64;
        for n in [
            2u128,
            3,
            7,
            3 << 30,
            (1 << 32) + 5,
            (1 << 40) + 3,
            3 << 62,
            u64::MAX as u128,
            wide,
            u128::MAX - 5,
        ] {
            let buckets = n.min(4);
            let width = n.div_ceil(buckets);
            let mut seen = vec![0usize; buckets as usize];
            let mut residues = [0usize; 3];
            let draws = 40_000;
            for _ in 0..draws {
                let x = rng.below(n);
                assert!(x < n, "{x} drawn below {n}");
                seen[(x / width) as usize] += 1;
                residues[(x % 3) as usize] += 1;
            }
            for (r, count) in residues.iter().enumerate() {
                let values = (n + 2 - r as u128) / 3;
                let expected = draws as f64 * (values as f64 / n as f64);
                assert!(
                    (*count as f64 - expected).abs() < 5.0 * expected.sqrt().max(1.0),
                    "n={n}: {count} of {draws} are {r} modulo 3"
                );
            }
            for (b, count) in seen.iter().enumerate() {
                let size = (width * (b as u128 + 1)).min(n) - width * b as u128;
                let expected = draws as f64 * (size as f64 / n as f64);
                let tol = 5.0 * expected.sqrt();
                assert!(
                    (*count as f64 - expected).abs() < tol,
                    "n={n}: bucket {b} got {count} of {draws}"
                );
            }
        }
    }

    #[test]
    fn bernoulli_exp_matches_its_probability() {
        let mut rng = SecureUniform::default();
        for (num, den) in [(1u128, 2u128), (3, 2), (5, 1)] {
            let n = 40_000;
            let hits =
                (0..n).filter(|_| bernoulli_exp(&mut rng, num, den)).count() as f64 / n as f64;
            let p = (-(num as f64) / den as f64).exp();
            // Four standard errors.
            let tol = 4.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!((hits - p).abs() < tol, "exp(-{num}/{den}): {hits} vs {p}");
        }
    }

    #[test]
    fn discrete_laplace_has_the_right_variance_and_shape() {
        for b in [0.5, 2.0, 7.5] {
            let noise = Noise::laplace(b);
            let xs = draws(noise, 40_000);
            let (mean, var) = mean_var(&xs);
            // Variance of the discrete Laplace with parameter e^(-1/b): 2q/(1-q)².
            let q = (-1.0 / b).exp();
            let expected = 2.0 * q / (1.0 - q).powi(2);
            assert!(
                mean.abs() < 5.0 * (expected / xs.len() as f64).sqrt() + 1e-9,
                "b={b}: mean {mean}"
            );
            assert!(
                (var / expected - 1.0).abs() < 0.08,
                "b={b}: variance {var} vs {expected}"
            );
            // P(X = 0) = (1-q)/(1+q).
            let p0 = xs.iter().filter(|&&x| x == 0).count() as f64 / xs.len() as f64;
            let expected0 = (1.0 - q) / (1.0 + q);
            assert!(
                (p0 - expected0).abs()
                    < 4.0 * (expected0 * (1.0 - expected0) / xs.len() as f64).sqrt(),
                "b={b}: P(0) {p0} vs {expected0}"
            );
            // Symmetric.
            let pos = xs.iter().filter(|&&x| x > 0).count() as f64;
            let neg = xs.iter().filter(|&&x| x < 0).count() as f64;
            assert!((pos - neg).abs() < 5.0 * (pos + neg).sqrt());
        }
    }

    #[test]
    fn discrete_gaussian_has_the_right_variance() {
        for (num, den) in [(4u128, 1u128), (25, 1), (9, 4)] {
            let sigma2 = num as f64 / den as f64;
            let xs = draws(Noise::Gaussian { num, den }, 30_000);
            let (mean, var) = mean_var(&xs);
            assert!(
                mean.abs() < 5.0 * (sigma2 / xs.len() as f64).sqrt(),
                "sigma²={sigma2}: mean {mean}"
            );
            // For sigma ≥ 1 the discrete Gaussian's variance is within a hair of sigma².
            assert!(
                (var / sigma2 - 1.0).abs() < 0.08,
                "sigma²={sigma2}: variance {var}"
            );
        }
    }

    #[test]
    fn the_pool_serves_the_distribution_it_is_asked_for() {
        let small = take_many(Noise::laplace(1.0), 2_000);
        let large = take_many(Noise::laplace(50.0), 2_000);
        let (_, v_small) = mean_var(&small);
        let (_, v_large) = mean_var(&large);
        assert!(v_large > 100.0 * v_small, "{v_small} vs {v_large}");
        assert!(Noise::laplace(10.0).bound(0.95) > 29.0 && Noise::laplace(10.0).bound(0.95) < 31.0);
    }
}
