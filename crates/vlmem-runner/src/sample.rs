//! Choosing each generated token: greedy (the arg-max) or sampled, as Qwen3-VL's users know it
//! from transformers and vLLM.
//!
//! [`SamplingParams`] are the knobs; [`Sampler`] applies them to one step's logits, in the
//! usual order:
//!
//! 1. penalties: the repetition penalty over every id seen so far (prompt and reply, as
//!    transformers does), then the presence and frequency penalties over the reply's ids (as
//!    vLLM and the OpenAI API do);
//! 2. temperature (0 is greedy: the arg-max of the penalised logits, the first index on
//!    ties; so is `top_k` 1);
//! 3. top-k, top-p, min-p, each over what the previous one left, renormalised;
//! 4. one draw from the seeded ChaCha generator the sampler owns.
//!
//! All probability arithmetic is f64 with the largest logit subtracted before `exp`, so a
//! `-inf` logit (a masked token) has probability 0 and never turns into NaN.
//!
//! [`GenerationConfig`] reads a checkpoint's `generation_config.json`: its sampling defaults
//! (used only when it sets `do_sample`) and its end-of-sequence ids.

use crate::error::{Result, RunnerError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

/// How each generated token is chosen. [`SamplingParams::default`] is greedy with no penalty,
/// the engine's behaviour when nothing asks for sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; finite and `>= 0`. `0` is greedy (the arg-max,
    /// first index on ties); below 1 sharpens, above 1 flattens. Qwen3-VL-Instruct ships 0.7.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (ties broken towards the lower id); `0` keeps
    /// them all, `1` is greedy.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability
    /// (after top-k) reaches `top_p`; in `(0, 1]`, `1` keeps them all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; in `[0, 1]`, `0` keeps
    /// them all.
    pub min_p: f32,
    /// transformers' repetition penalty over every id of the prompt and the reply so far: a
    /// positive logit is divided by it, a negative one multiplied; finite and `> 0`, `1` is
    /// none.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every id the reply already holds; in `[-2, 2]`,
    /// `0` is none.
    pub presence_penalty: f32,
    /// Subtracted from the logit of every id the reply already holds, times its count; in
    /// `[-2, 2]`, `0` is none.
    pub frequency_penalty: f32,
    /// The random generator's seed: the same seed, settings and logits give the same ids.
    /// `None` draws one from the operating system's entropy ([`Sampler::seed`] says which).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy: the arg-max at each step, no penalty.
    pub const fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }

    /// True when every token is the arg-max of the (penalised) logits: temperature 0 or
    /// `top_k` 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// True when some penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Checks every value against its range ([`RunnerError::BadRequest`] naming the first
    /// one out of it).
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, value: f32, range: &str| {
            Err(RunnerError::BadRequest(format!(
                "sampling: {name} {value} is out of range (it must be {range})"
            )))
        };
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return bad("temperature", t, "finite and >= 0");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad("top_p", p, "in (0, 1]");
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return bad("min_p", m, "in [0, 1]");
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return bad("repetition_penalty", r, "finite and > 0");
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, v, "in [-2, 2]");
            }
        }
        Ok(())
    }
}

/// Applies the penalties of `params` to `logits` in place: the repetition penalty to every
/// distinct id of `prompt_ids` and `generated_ids`, then `frequency_penalty * count +
/// presence_penalty` subtracted for every id `generated_ids` holds. Ids outside the
/// vocabulary are ignored.
pub fn apply_penalties(
    params: &SamplingParams,
    logits: &mut [f64],
    prompt_ids: &[u32],
    generated_ids: &[u32],
) {
    if params.repetition_penalty != 1.0 {
        let penalty = f64::from(params.repetition_penalty);
        let mut seen: Vec<u32> = prompt_ids.iter().chain(generated_ids).copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(x) = logits.get_mut(id as usize) {
                *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let (presence, frequency) = (
            f64::from(params.presence_penalty),
            f64::from(params.frequency_penalty),
        );
        let mut reply = generated_ids.to_vec();
        reply.sort_unstable();
        for run in reply.chunk_by(|a, b| a == b) {
            if let Some(x) = logits.get_mut(run[0] as usize) {
                *x -= frequency * run.len() as f64 + presence;
            }
        }
    }
}

/// Index of the largest value, the first one on ties; NaN is never chosen over a number.
fn argmax_f64(values: &[f64]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || (values[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// Chooses each generated token per [`SamplingParams`]; owns its random generator, so a
/// seeded sampler replays the same draws.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    seed: Option<u64>,
}

impl Sampler {
    /// A sampler for `params` (checked: [`SamplingParams::validate`]). A sampling one
    /// without a seed draws its seed from the operating system's entropy.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = if params.is_greedy() {
            None
        } else {
            Some(params.seed.unwrap_or_else(rand::random))
        };
        Ok(Sampler {
            rng: ChaCha20Rng::seed_from_u64(seed.unwrap_or(0)),
            params,
            seed,
        })
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed the draws come from (drawn from entropy when none was given); `None` when
    /// greedy, which draws nothing.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The next token given this step's `logits` (one per vocabulary id), the prompt and the
    /// ids generated so far (for the penalties). Empty logits, or logits that are all
    /// `-inf` or NaN when sampling, are a [`RunnerError::BadRequest`].
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt_ids: &[u32],
        generated_ids: &[u32],
    ) -> Result<u32> {
        if logits.is_empty() {
            return Err(RunnerError::BadRequest(
                "sampling: the model returned no logits".into(),
            ));
        }
        if self.params.is_greedy() && !self.params.has_penalties() {
            // Bit for bit the greedy path the reference outputs were made with.
            return Ok(crate::model::argmax(logits));
        }
        let mut scores: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        apply_penalties(&self.params, &mut scores, prompt_ids, generated_ids);
        if self.params.is_greedy() {
            return Ok(argmax_f64(&scores));
        }
        let kept = self.kept(&scores)?;
        let total: f64 = kept.iter().map(|&(_, w)| w).sum();
        let r = self.rng.r#gen::<f64>() * total;
        let mut cumulative = 0.0;
        for &(id, w) in &kept {
            cumulative += w;
            if r < cumulative {
                return Ok(id);
            }
        }
        // Rounding left `r` at the very top: the last token with any weight.
        Ok(kept
            .iter()
            .rev()
            .find(|&&(_, w)| w > 0.0)
            .map_or(kept[0].0, |&(id, _)| id))
    }

    /// The distribution the next draw comes from: `(id, probability)` for every token that
    /// survives the penalties, temperature, top-k, top-p and min-p, most likely first,
    /// summing to 1. Greedy settings give the arg-max with probability 1.
    pub fn distribution(
        &self,
        logits: &[f32],
        prompt_ids: &[u32],
        generated_ids: &[u32],
    ) -> Result<Vec<(u32, f64)>> {
        if logits.is_empty() {
            return Err(RunnerError::BadRequest(
                "sampling: the model returned no logits".into(),
            ));
        }
        let mut scores: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        apply_penalties(&self.params, &mut scores, prompt_ids, generated_ids);
        if self.params.is_greedy() {
            return Ok(vec![(argmax_f64(&scores), 1.0)]);
        }
        let mut kept = self.kept(&scores)?;
        let total: f64 = kept.iter().map(|&(_, w)| w).sum();
        for (_, w) in &mut kept {
            *w /= total;
        }
        kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(kept)
    }

    /// The tokens the filters keep, with unnormalised weights `exp((s - max) / T)`; sorted
    /// most likely first (ties: lower id first) when a filter needed the order.
    fn kept(&self, scores: &[f64]) -> Result<Vec<(u32, f64)>> {
        let p = &self.params;
        let inv_t = 1.0 / f64::from(p.temperature);
        // Masked (-inf) and NaN logits can never be drawn.
        let mut cand: Vec<(u32, f64)> = scores
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s > f64::NEG_INFINITY)
            .map(|(i, &s)| (i as u32, s * inv_t))
            .collect();
        if cand.is_empty() {
            return Err(RunnerError::BadRequest(
                "sampling: every logit is -inf or NaN".into(),
            ));
        }
        let by_rank = |a: &(u32, f64), b: &(u32, f64)| -> Ordering {
            b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
        };
        let filtered = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_rank);
            cand.truncate(p.top_k);
        }
        if filtered {
            cand.sort_unstable_by(by_rank);
        }
        let max = cand
            .iter()
            .map(|&(_, s)| s)
            .fold(f64::NEG_INFINITY, f64::max);
        // exp(s - max) in (0, 1]; with +inf logits those share the mass and the rest get 0.
        for (_, s) in &mut cand {
            *s = if max == f64::INFINITY {
                f64::from(u8::from(*s == f64::INFINITY))
            } else {
                (*s - max).exp()
            };
        }
        if p.top_p < 1.0 {
            let total: f64 = cand.iter().map(|&(_, w)| w).sum();
            let want = f64::from(p.top_p) * total;
            let mut before = 0.0;
            let mut keep = 0;
            for &(_, w) in &cand {
                if keep > 0 && before >= want {
                    break;
                }
                before += w;
                keep += 1;
            }
            cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            // Weights are relative to the most likely token (weight 1), which is kept.
            let floor = f64::from(p.min_p);
            let keep = cand.iter().take_while(|&&(_, w)| w >= floor).count().max(1);
            cand.truncate(keep);
        }
        Ok(cand)
    }
}

/// A checkpoint's `generation_config.json`: the fields that choose tokens and end a reply.
/// Absent fields are `None`; [`GenerationConfig::sampling`] fills them with transformers'
/// defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationConfig {
    /// Whether the checkpoint samples by default (`do_sample`); greedy when false or absent.
    pub do_sample: bool,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// `eos_token_id`, one id or a list (Qwen3-VL-Instruct: 151645 and 151643).
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// The file's name in a checkpoint folder.
    pub const FILE: &'static str = "generation_config.json";

    /// Reads `dir`/generation_config.json; a folder without one gives the defaults (greedy,
    /// no end ids). A file that is there but unreadable or malformed is an error naming it.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(RunnerError::io(path, e)),
        }
    }

    /// Parses the text of a generation_config.json (`path` names it in errors). The sampling
    /// values it sets must be in range ([`SamplingParams::validate`]).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let malformed = |message: String| {
            RunnerError::Checkpoint(vlmem_qwen3vl::Error::Config {
                path: PathBuf::from(path),
                message,
            })
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| malformed(format!("not JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| malformed("not a JSON object".into()))?;
        // A field that is absent or null is unset.
        let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
        let float = |name: &str| -> Result<Option<f32>> {
            field(name)
                .map(|v| {
                    v.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| malformed(format!("{name} is {v}, not a number")))
                })
                .transpose()
        };
        let id = |v: &serde_json::Value| -> Result<u32> {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| malformed(format!("eos_token_id holds {v}, not a token id")))
        };
        let eos_token_ids = match field("eos_token_id") {
            None => Vec::new(),
            Some(serde_json::Value::Array(list)) => list.iter().map(id).collect::<Result<_>>()?,
            Some(v) => vec![id(v)?],
        };
        let do_sample = match field("do_sample") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| malformed(format!("do_sample is {v}, not true or false")))?,
        };
        let top_k = field("top_k")
            .map(|v| {
                v.as_u64()
                    .and_then(|k| usize::try_from(k).ok())
                    .ok_or_else(|| malformed(format!("top_k is {v}, not a count")))
            })
            .transpose()?;
        let config = GenerationConfig {
            do_sample,
            temperature: float("temperature")?,
            top_k,
            top_p: float("top_p")?,
            min_p: float("min_p")?,
            repetition_penalty: float("repetition_penalty")?,
            eos_token_ids,
        };
        config
            .sampling()
            .validate()
            .and_then(|()| config.sampled().validate())
            .map_err(|e| malformed(e.to_string()))?;
        Ok(config)
    }

    /// The token choice the checkpoint asks for: its sampling settings when `do_sample` is
    /// set (transformers' defaults for those it leaves out: temperature 1, top_k 50, top_p
    /// 1), greedy otherwise. Its repetition penalty applies either way, as in transformers.
    pub fn sampling(&self) -> SamplingParams {
        if self.do_sample {
            self.sampled()
        } else {
            SamplingParams {
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                ..SamplingParams::greedy()
            }
        }
    }

    /// The checkpoint's sampling settings as if `do_sample` were set.
    fn sampled(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(50),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            ..SamplingParams::greedy()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn the_default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy() && !p.has_penalties());
        p.validate().unwrap();
        assert_eq!(Sampler::new(p).unwrap().seed(), None);
    }

    #[test]
    fn out_of_range_values_are_bad_requests() {
        let base = sampling(1.0);
        let cases = [
            SamplingParams {
                temperature: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                temperature: -0.5,
                ..base.clone()
            },
            SamplingParams {
                temperature: f32::INFINITY,
                ..base.clone()
            },
            SamplingParams {
                top_p: 0.0,
                ..base.clone()
            },
            SamplingParams {
                top_p: 1.5,
                ..base.clone()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                min_p: -0.1,
                ..base.clone()
            },
            SamplingParams {
                min_p: 1.01,
                ..base.clone()
            },
            SamplingParams {
                min_p: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..base.clone()
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..base.clone()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..base.clone()
            },
            SamplingParams {
                frequency_penalty: f32::NEG_INFINITY,
                ..base.clone()
            },
        ];
        for p in cases {
            match Sampler::new(p.clone()) {
                Err(RunnerError::BadRequest(m)) => assert!(m.starts_with("sampling: "), "{m}"),
                other => panic!("{p:?} gave {other:?}"),
            }
        }
        for p in [
            SamplingParams {
                top_p: 1.0,
                min_p: 1.0,
                ..base.clone()
            },
            SamplingParams {
                presence_penalty: -2.0,
                frequency_penalty: 2.0,
                ..base.clone()
            },
        ] {
            p.validate().unwrap();
        }
    }

    #[test]
    fn temperature_zero_and_top_k_one_are_the_first_argmax() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, f32::NEG_INFINITY];
        for p in [
            SamplingParams::greedy(),
            SamplingParams {
                top_k: 1,
                ..sampling(1.0)
            },
            SamplingParams {
                top_k: 1,
                ..sampling(50.0)
            },
        ] {
            let mut s = Sampler::new(p).unwrap();
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[], &[]).unwrap(), 1);
            }
        }
        // With a penalty the arg-max is taken over the penalised logits.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&logits, &[1], &[]).unwrap(), 3);
    }

    #[test]
    fn one_token_equal_logits_and_masked_tokens_never_give_nan() {
        let mut s = Sampler::new(sampling(1.0)).unwrap();
        assert_eq!(s.sample(&[-3.0], &[], &[]).unwrap(), 0);
        assert_eq!(
            s.distribution(&[f32::MAX], &[], &[]).unwrap(),
            vec![(0, 1.0)]
        );
        let flat = s.distribution(&[2.0; 4], &[], &[]).unwrap();
        assert_eq!(flat.len(), 4);
        assert!(
            flat.iter().all(|&(_, p)| (p - 0.25).abs() < 1e-15),
            "{flat:?}"
        );
        // Masked tokens are never drawn, and huge logits do not overflow.
        let logits = [
            f32::NEG_INFINITY,
            f32::MAX,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::NAN,
        ];
        let d = s.distribution(&logits, &[], &[]).unwrap();
        assert_eq!(d, vec![(1, 0.5), (3, 0.5)]);
        for _ in 0..200 {
            let id = s.sample(&logits, &[], &[]).unwrap();
            assert!(id == 1 || id == 3, "{id}");
        }
        // +inf logits share the mass.
        let d = s
            .distribution(&[f32::INFINITY, 1.0, f32::INFINITY], &[], &[])
            .unwrap();
        assert_eq!(d, vec![(0, 0.5), (2, 0.5), (1, 0.0)]);
        // A tiny temperature is the arg-max, not a NaN.
        let mut cold = Sampler::new(sampling(1e-30)).unwrap();
        for _ in 0..20 {
            assert_eq!(cold.sample(&[1.0, 1.0001, 0.9], &[], &[]).unwrap(), 1);
        }
        // Nothing to draw from is an error, never a panic.
        assert!(matches!(
            s.sample(&[f32::NEG_INFINITY, f32::NAN], &[], &[]),
            Err(RunnerError::BadRequest(_))
        ));
        assert!(matches!(
            s.sample(&[], &[], &[]),
            Err(RunnerError::BadRequest(_))
        ));
    }

    #[test]
    fn the_same_seed_draws_the_same_ids() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                top_p: 0.9,
                ..sampling(1.0)
            })
            .unwrap();
            (0..100)
                .map(|_| s.sample(&logits, &[], &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        // Without a seed, one is drawn and reported; it replays the same ids.
        let mut s = Sampler::new(SamplingParams {
            seed: None,
            ..sampling(1.0)
        })
        .unwrap();
        let seed = s.seed().unwrap();
        let a: Vec<u32> = (0..50)
            .map(|_| s.sample(&logits, &[], &[]).unwrap())
            .collect();
        let mut t = Sampler::new(SamplingParams {
            seed: Some(seed),
            ..sampling(1.0)
        })
        .unwrap();
        let b: Vec<u32> = (0..50)
            .map(|_| t.sample(&logits, &[], &[]).unwrap())
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut logits = [4.0, -3.0, 1.0, 0.0, 5.0];
        // Id 0 is in the prompt and twice in the reply: penalised once. Id 9 is outside the
        // vocabulary: ignored.
        apply_penalties(&p, &mut logits, &[0, 1, 9], &[0, 0, 3]);
        assert_eq!(logits, [2.0, -6.0, 1.0, 0.0, 5.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_only_the_reply() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut logits = [1.0, 1.0, 1.0, 1.0];
        apply_penalties(&p, &mut logits, &[0, 0, 0], &[1, 2, 2, 2, 7]);
        // id 1: 1 - (0.25 * 1 + 0.5); id 2: 1 - (0.25 * 3 + 0.5).
        assert_eq!(logits, [1.0, 0.25, -0.25, 1.0]);
    }

    #[test]
    fn penalties_change_the_sampled_distribution_as_defined() {
        // Logits ln 1, ln 2, ln 4; id 2 is in the prompt, id 1 in the reply. A repetition
        // penalty of 2 halves both positive logits (ln 4 -> ln 2, ln 2 -> ln 2 / 2), and a
        // presence penalty of 0.5 then lowers id 1 alone: weights 1, sqrt(2) e^-0.5, 2.
        let logits = [0.0f32, 2f32.ln(), 4f32.ln()];
        let s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            ..sampling(1.0)
        })
        .unwrap();
        let mut d = s.distribution(&logits, &[2], &[1]).unwrap();
        d.sort_by_key(|&(id, _)| id);
        let w = [1.0, 2f64.sqrt() * (-0.5f64).exp(), 2.0];
        let total: f64 = w.iter().sum();
        for (k, &(id, p)) in d.iter().enumerate() {
            assert_eq!(id as usize, k);
            assert!((p - w[k] / total).abs() < 1e-6, "{d:?}");
        }
        // Penalties shift greedy choices too: id 2 repeated loses to id 1.
        let mut g = Sampler::new(SamplingParams {
            repetition_penalty: 3.0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(g.sample(&logits, &[], &[]).unwrap(), 2);
        assert_eq!(g.sample(&logits, &[], &[2]).unwrap(), 1);
    }

    #[test]
    fn filters_keep_what_transformers_keeps() {
        // Probabilities 0.4, 0.3, 0.2, 0.1 (as logits, shuffled ids).
        let logits = [0.2f32.ln(), 0.4f32.ln(), 0.1f32.ln(), 0.3f32.ln()];
        let ids = |p: SamplingParams| -> Vec<u32> {
            let s = Sampler::new(p).unwrap();
            s.distribution(&logits, &[], &[])
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(
            ids(SamplingParams {
                top_k: 2,
                ..sampling(1.0)
            }),
            [1, 3]
        );
        assert_eq!(
            ids(SamplingParams {
                top_k: 9,
                ..sampling(1.0)
            }),
            [1, 3, 0, 2]
        );
        // top_p: the smallest head whose mass reaches top_p.
        assert_eq!(
            ids(SamplingParams {
                top_p: 0.35,
                ..sampling(1.0)
            }),
            [1]
        );
        assert_eq!(
            ids(SamplingParams {
                top_p: 0.5,
                ..sampling(1.0)
            }),
            [1, 3]
        );
        assert_eq!(
            ids(SamplingParams {
                top_p: 0.75,
                ..sampling(1.0)
            }),
            [1, 3, 0]
        );
        // top_p after top_k: 0.4, 0.3, 0.2 renormalised are 4/9, 3/9, 2/9, so the first
        // two reach 0.75 (without top_k they hold 0.7 and a third is needed).
        assert_eq!(
            ids(SamplingParams {
                top_k: 3,
                top_p: 0.75,
                ..sampling(1.0)
            }),
            [1, 3]
        );
        // min_p: at least min_p times the most likely.
        assert_eq!(
            ids(SamplingParams {
                min_p: 0.45,
                ..sampling(1.0)
            }),
            [1, 3, 0]
        );
        assert_eq!(
            ids(SamplingParams {
                min_p: 0.6,
                ..sampling(1.0)
            }),
            [1, 3]
        );
        assert_eq!(
            ids(SamplingParams {
                min_p: 1.0,
                ..sampling(1.0)
            }),
            [1]
        );
        // Ties at the top-k edge go to the lower id.
        let s = Sampler::new(SamplingParams {
            top_k: 2,
            ..sampling(1.0)
        })
        .unwrap();
        let d = s.distribution(&[1.0, 2.0, 1.0, 1.0], &[], &[]).unwrap();
        assert_eq!(d.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [1, 0]);
    }

    fn parse(text: &str) -> Result<GenerationConfig> {
        GenerationConfig::parse(text, Path::new("generation_config.json"))
    }

    #[test]
    fn generation_config_reads_qwen3_vl_instruct() {
        let c = parse(
            r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
                "eos_token_id": [151645, 151643], "top_k": 20, "top_p": 0.8,
                "repetition_penalty": 1.0, "temperature": 0.7,
                "transformers_version": "4.56.0"}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token_ids, [151645, 151643]);
        let s = c.sampling();
        assert_eq!((s.temperature, s.top_k, s.top_p), (0.7, 20, 0.8));
        assert!(!s.is_greedy() && !s.has_penalties());
        assert_eq!(s.seed, None);
    }

    #[test]
    fn generation_config_is_greedy_unless_it_asks_to_sample() {
        for text in [
            "{}",
            r#"{"_from_model_config": true, "use_cache": true}"#,
            r#"{"do_sample": false, "temperature": 0.7, "top_k": 20}"#,
            r#"{"do_sample": null, "temperature": null}"#,
        ] {
            let c = parse(text).unwrap();
            assert_eq!(c.sampling(), SamplingParams::greedy(), "{text}");
        }
        // Sampling with transformers' defaults for what it leaves out.
        let s = parse(r#"{"do_sample": true}"#).unwrap().sampling();
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p),
            (1.0, 50, 1.0, 0.0)
        );
        // A repetition penalty applies to greedy choice too.
        let s = parse(r#"{"repetition_penalty": 1.05}"#).unwrap().sampling();
        assert!(s.is_greedy() && s.repetition_penalty == 1.05);
        // One eos id or none.
        assert_eq!(parse(r#"{"eos_token_id": 7}"#).unwrap().eos_token_ids, [7]);
        assert!(
            parse(r#"{"eos_token_id": null}"#)
                .unwrap()
                .eos_token_ids
                .is_empty()
        );
    }

    #[test]
    fn a_missing_generation_config_is_the_default_and_a_broken_one_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            GenerationConfig::load(tmp.path()).unwrap(),
            GenerationConfig::default()
        );
        for text in [
            "{ not json",
            "[1, 2]",
            r#"{"eos_token_id": "151645"}"#,
            r#"{"eos_token_id": [151645, -1]}"#,
            r#"{"eos_token_id": 1e20}"#,
            r#"{"do_sample": "yes"}"#,
            r#"{"top_k": -5}"#,
            r#"{"top_k": 2.5}"#,
            r#"{"temperature": "hot"}"#,
            r#"{"do_sample": true, "top_p": 0}"#,
            r#"{"temperature": -1}"#,
        ] {
            std::fs::write(tmp.path().join(GenerationConfig::FILE), text).unwrap();
            match GenerationConfig::load(tmp.path()) {
                Err(RunnerError::Checkpoint(vlmem_qwen3vl::Error::Config { path, .. })) => {
                    assert!(path.ends_with(GenerationConfig::FILE), "{text}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
