//! Images of a request: where their bytes come from and how they are decoded.
//!
//! An `image_url` is one of
//! - a data URL, `data:image/png;base64,...` (any `image/*` type; PNG and JPEG decode);
//! - raw base64 of the image file;
//! - `file:///path`, only under the folder given by `--allowed-media-path` (the path is
//!   resolved, links included, before it is checked);
//! - `http://` or `https://`, fetched with a timeout and at most [`MediaConfig::max_image_bytes`].
//!
//! Decoding reads the header first: an image claiming more than
//! [`MediaConfig::max_decode_pixels`] is refused (413) before any pixel buffer exists, and
//! the decoder is held to the header's dimensions and an allocation limit. An image larger
//! than [`MediaConfig::max_image_pixels`] is scaled down, its aspect kept, never refused.

use crate::error::ApiError;
use base64::Engine as _;
use image::{ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The preprocessor's own largest image (Qwen3-VL's `longest_edge`): the default of
/// [`MediaConfig::max_image_pixels`], so that the server sees an image as `vlmem run` does.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 16_777_216;

/// The largest image decoded at all, unless [`MediaConfig::max_image_pixels`] is larger:
/// 8192 x 8192 (192 MiB as RGB).
pub const DEFAULT_MAX_DECODE_PIXELS: u64 = 67_108_864;

/// The largest image file (encoded bytes) accepted from any source.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 32 << 20;

/// How images are read.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// `file://` URLs are read only under this folder (resolved); `None`: refused.
    pub allowed_media_path: Option<PathBuf>,
    /// Larger images are scaled down to at most this many pixels, aspect kept.
    pub max_image_pixels: u64,
    /// Larger images (by their header) are refused before decoding.
    pub max_decode_pixels: u64,
    /// Larger image files are refused.
    pub max_image_bytes: usize,
    /// The client for http(s) URLs (`None`: such URLs are refused).
    pub http: Option<reqwest::Client>,
}

impl MediaConfig {
    /// Default limits; http(s) URLs fetched with a 30 s timeout and at most 5 redirects;
    /// `file://` URLs under `allowed_media_path` only.
    pub fn new(allowed_media_path: Option<PathBuf>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("vlmem/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| tracing::warn!("no HTTP client for image URLs: {e}"))
            .ok();
        MediaConfig {
            allowed_media_path,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_decode_pixels: DEFAULT_MAX_DECODE_PIXELS,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            http,
        }
    }

    /// The largest image decoded: [`MediaConfig::max_decode_pixels`], or more when
    /// [`MediaConfig::max_image_pixels`] allows more.
    pub fn decode_cap(&self) -> u64 {
        self.max_decode_pixels.max(self.max_image_pixels)
    }
}

/// The bytes of the image at `url`; `param` names it in errors.
pub async fn fetch(url: &str, cfg: &MediaConfig, param: &str) -> Result<Vec<u8>, ApiError> {
    let url = url.trim();
    let lower: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower.starts_with("data:") {
        return data_url(url, cfg, param);
    }
    if lower.starts_with("file://") {
        let path = percent_decode(&url["file://".len()..]);
        let cfg = cfg.clone();
        let param = param.to_string();
        return tokio::task::spawn_blocking(move || read_file(Path::new(&path), &cfg, &param))
            .await
            .map_err(|e| ApiError::internal(format!("reading an image: {e}")))?;
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return fetch_http(url, cfg, param).await;
    }
    if url.contains("://") {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "unsupported image URL scheme in '{}': use a data URL, base64, http(s) or file://",
                url.chars().take(40).collect::<String>()
            ),
        ));
    }
    decode_base64(url, cfg, param).map_err(|e| {
        ApiError::invalid_param(
            param,
            format!(
                "the image URL is neither a data URL, an http(s) or file:// URL, nor base64 ({e})"
            ),
        )
    })?
}

/// `data:image/...;base64,DATA`.
fn data_url(url: &str, cfg: &MediaConfig, param: &str) -> Result<Vec<u8>, ApiError> {
    let bad = |m: &str| ApiError::invalid_param(param, format!("malformed data URL: {m}"));
    let (head, data) = url["data:".len()..]
        .split_once(',')
        .ok_or_else(|| bad("no ',' before the data"))?;
    let mut parts = head.split(';');
    let mime = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !mime.starts_with("image/") {
        return Err(bad(&format!("the media type '{mime}' is not image/*")));
    }
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(bad("only base64 data URLs are read (';base64,')"));
    }
    decode_base64(data, cfg, param)
        .map_err(|e| ApiError::invalid_param(param, format!("malformed base64 in data URL: {e}")))?
}

/// Base64 (standard or URL-safe alphabet, padded or not, whitespace ignored). The outer
/// error is malformed base64; the inner one an image over the size limit.
fn decode_base64(
    data: &str,
    cfg: &MediaConfig,
    param: &str,
) -> Result<Result<Vec<u8>, ApiError>, String> {
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if cleaned.is_empty() {
        return Err("no data".into());
    }
    if cleaned.len() / 4 * 3 > cfg.max_image_bytes + 3 {
        return Ok(Err(too_many_bytes(param, cleaned.len() / 4 * 3, cfg)));
    }
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    let lenient =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let standard = GeneralPurpose::new(&base64::alphabet::STANDARD, lenient);
    let url_safe = GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient);
    let bytes = standard
        .decode(&cleaned)
        .or_else(|e| url_safe.decode(&cleaned).map_err(|_| e))
        .map_err(|e| e.to_string())?;
    Ok(Ok(bytes))
}

fn too_many_bytes(param: &str, bytes: usize, cfg: &MediaConfig) -> ApiError {
    let mut e = ApiError::too_large(format!(
        "the image is {bytes} bytes; this server takes images of at most {} bytes",
        cfg.max_image_bytes
    ));
    e.param = Some(param.to_string());
    e
}

/// `%XX` escapes of a file URL's path.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A file under the allowed folder.
fn read_file(path: &Path, cfg: &MediaConfig, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some(root) = &cfg.allowed_media_path else {
        return Err(ApiError::invalid_param(
            param,
            "file:// image URLs are refused: the server was started without --allowed-media-path",
        ));
    };
    let refused = || {
        ApiError::invalid_param(
            param,
            format!(
                "file:// image URLs must name a file under the allowed media folder ({})",
                root.display()
            ),
        )
    };
    if !path.is_absolute() {
        return Err(refused());
    }
    // Resolved (links, `..`) before the check; a file that does not exist is the same
    // answer as one outside, so the answer tells nothing about the rest of the disk.
    let real = path.canonicalize().map_err(|_| refused())?;
    if !real.starts_with(root) {
        return Err(refused());
    }
    let meta = std::fs::metadata(&real).map_err(|_| refused())?;
    if !meta.is_file() {
        return Err(refused());
    }
    if meta.len() > cfg.max_image_bytes as u64 {
        return Err(too_many_bytes(param, meta.len() as usize, cfg));
    }
    std::fs::read(&real)
        .map_err(|e| ApiError::invalid_param(param, format!("cannot read {}: {e}", real.display())))
}

/// An http(s) URL, at most `max_image_bytes`.
async fn fetch_http(url: &str, cfg: &MediaConfig, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some(client) = &cfg.http else {
        return Err(ApiError::invalid_param(
            param,
            "http(s) image URLs are not available on this server",
        ));
    };
    let failed = |e: String| ApiError::invalid_param(param, format!("fetching {url}: {e}"));
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    if let Some(n) = response.content_length()
        && n > cfg.max_image_bytes as u64
    {
        return Err(too_many_bytes(param, n as usize, cfg));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(e.to_string()))? {
        if bytes.len() + chunk.len() > cfg.max_image_bytes {
            return Err(too_many_bytes(param, bytes.len() + chunk.len(), cfg));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Decodes PNG or JPEG `bytes` to RGB: the header checked first (413 above the decode cap,
/// before any pixel is allocated), then scaled down to at most `max_image_pixels`.
pub fn decode(bytes: &[u8], cfg: &MediaConfig, param: &str) -> Result<RgbImage, ApiError> {
    let bad = |m: String| ApiError::invalid_param(param, m);
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(format!("unreadable image: {e}")))
    };
    let first = reader()?;
    match first.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(bad(format!(
                "{other:?} images are not supported: send PNG or JPEG"
            )));
        }
        None => return Err(bad("not an image (PNG or JPEG expected)".into())),
    }
    let (w, h) = first
        .into_dimensions()
        .map_err(|e| bad(format!("malformed image: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels == 0 {
        return Err(bad("the image has no pixels".into()));
    }
    if pixels > cfg.decode_cap() {
        let mut e = ApiError::too_large(format!(
            "the image is {w} x {h} pixels; this server decodes at most {} pixels",
            cfg.decode_cap()
        ));
        e.param = Some(param.to_string());
        return Err(e);
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // The decoded image (up to 16-bit RGBA) and the decoder's own buffers.
    limits.max_alloc = Some(pixels * 8 + (64 << 20));
    let mut r = reader()?;
    r.limits(limits);
    let img = r
        .decode()
        .map_err(|e| bad(format!("malformed image: {e}")))?
        .into_rgb8();
    scale_down(img, cfg.max_image_pixels).map_err(|e| bad(format!("resizing the image: {e}")))
}

/// `img` with at most `max_pixels` pixels, its aspect kept (Pillow's bicubic, as the
/// preprocessor resizes).
pub fn scale_down(img: RgbImage, max_pixels: u64) -> Result<RgbImage, String> {
    let (w, h) = (img.width() as u64, img.height() as u64);
    if w * h <= max_pixels.max(1) {
        return Ok(img);
    }
    let (nw, nh) = scaled_size(w, h, max_pixels.max(1));
    vlmem_runner::preprocess::resize_bicubic(&img, nw as usize, nh as usize)
        .map_err(|e| e.to_string())
}

/// The largest `(w', h')` with `w' * h' <= max_pixels` and `w' / h'` as close to `w / h`
/// as whole pixels allow (each at least 1).
fn scaled_size(w: u64, h: u64, max_pixels: u64) -> (u64, u64) {
    let scale = (max_pixels as f64 / (w * h) as f64).sqrt();
    let mut nw = ((w as f64 * scale).floor() as u64).clamp(1, w);
    let mut nh = ((h as f64 * scale).floor() as u64).clamp(1, h);
    while nw * nh > max_pixels && (nw > 1 || nh > 1) {
        if nw >= nh {
            nw -= 1;
        } else {
            nh -= 1;
        }
    }
    (nw, nh)
}

/// A small PNG file whose header claims `w` x `h` pixels (the IHDR chunk, a few bytes of
/// compressed data, IEND): what a hostile client sends to make a server allocate a huge
/// image. The server refuses it before decoding; its tests and `vlmem bench serve --stress`
/// send it.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    // The PNG chunk checksum (CRC-32, polynomial 0xEDB88320).
    let crc32 = |bytes: &[u8]| {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[..]),
        (b"IDAT", &[0x78, 0x9c, 0x63, 0, 0, 0, 1, 0, 1][..]),
        (b"IEND", &[][..]),
    ] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MediaConfig {
        MediaConfig {
            allowed_media_path: None,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_decode_pixels: DEFAULT_MAX_DECODE_PIXELS,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            http: None,
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_huge_header_is_refused_before_decoding() {
        // The header is read as the test means: a small image decodes its claim.
        let e = decode(&png_claiming(64, 64), &cfg(), "p").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{e}");
        assert!(e.message.contains("malformed"), "{}", e.message);
        let e = decode(&png_claiming(50_000, 50_000), &cfg(), "p").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("50000 x 50000"), "{}", e.message);
    }

    #[test]
    fn large_images_are_scaled_down_keeping_their_aspect() {
        let mut c = cfg();
        c.max_image_pixels = 1000;
        let img = decode(&png(200, 100), &c, "p").unwrap();
        assert!(img.width() as u64 * img.height() as u64 <= 1000);
        assert_eq!((img.width(), img.height()), (44, 22));
        let img = decode(&png(20, 10), &c, "p").unwrap();
        assert_eq!((img.width(), img.height()), (20, 10), "small images stay");
        assert_eq!(scaled_size(10_000, 1, 100), (100, 1));
        assert_eq!(scaled_size(1, 10_000, 100), (1, 100));
    }

    #[test]
    fn bad_bytes_and_bad_base64_are_bad_requests() {
        let e = decode(b"hello", &cfg(), "p").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        let mut truncated = png(64, 64);
        truncated.truncate(truncated.len() / 2);
        let e = decode(&truncated, &cfg(), "p").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(decode_base64("@@@", &cfg(), "p").is_err());
        let ok = decode_base64("aGVsbG8", &cfg(), "p").unwrap().unwrap();
        assert_eq!(ok, b"hello");
    }

    #[tokio::test]
    async fn urls_of_every_kind() {
        use base64::engine::general_purpose::STANDARD;
        let bytes = png(8, 8);
        let b64 = STANDARD.encode(&bytes);
        let c = cfg();
        assert_eq!(
            fetch(&format!("data:image/png;base64,{b64}"), &c, "p")
                .await
                .unwrap(),
            bytes
        );
        assert_eq!(fetch(&b64, &c, "p").await.unwrap(), bytes);
        for bad in [
            "data:text/plain;base64,aGk=",
            "data:image/png,rawbytes",
            "data:image/png;base64",
            "ftp://example.invalid/a.png",
            "file:///etc/passwd",
        ] {
            let e = fetch(bad, &c, "p").await.unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }

        // file:// under the allowed folder only, links resolved first.
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("in dir");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("a.png"), &bytes).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("b.png"), &bytes).unwrap();
        std::os::unix::fs::symlink(outside.path().join("b.png"), inside.join("link.png")).unwrap();
        let mut c = cfg();
        c.allowed_media_path = Some(inside.canonicalize().unwrap());
        let url = format!("file://{}/a.png", inside.display()).replace(' ', "%20");
        assert_eq!(fetch(&url, &c, "p").await.unwrap(), bytes);
        for bad in [
            format!("file://{}/b.png", outside.path().display()),
            format!("file://{}/link.png", inside.display()),
            format!("file://{}/../x/a.png", inside.display()),
            format!("file://{}/missing.png", inside.display()),
        ] {
            let e = fetch(&bad, &c, "p").await.unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
        c.max_image_bytes = 10;
        let e = fetch(&url, &c, "p").await.unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let e = fetch(&b64, &c, "p").await.unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
