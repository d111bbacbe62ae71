//! Where a prompt's pieces end: never inside an image's run of pad tokens.
//!
//! A prompt pass over `ids[a..b]` encodes the images whose pads lie in it and scatters their
//! rows onto those pads. A piece may start inside an image (after a prefix shared in whole
//! KV blocks: the image is encoded again, or found in the vision cache, and only its rows
//! from there on are used), but it ends only at the end of an image, so that no image is
//! encoded for every piece of a long prompt.

use std::ops::Range;

/// The positions of each image's pads in a prompt, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ImageSpans {
    /// `[first, last + 1)` of image `j`'s pads.
    spans: Vec<Range<usize>>,
}

impl ImageSpans {
    /// The spans of `ids` whose `image_token_id` pads go to images of `pads[j]` pads each,
    /// in order (image `j` takes the next `pads[j]` pads). Pads beyond the images' count
    /// (a prompt the model will refuse) form no span.
    pub(super) fn of(ids: &[u32], image_token_id: u32, pads: &[usize]) -> Self {
        let mut spans = Vec::with_capacity(pads.len());
        let mut at = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id == image_token_id);
        for &n in pads {
            let mut first = None;
            let mut last = None;
            for (i, _) in at.by_ref().take(n) {
                first.get_or_insert(i);
                last = Some(i);
            }
            if let (Some(f), Some(l)) = (first, last) {
                spans.push(f..l + 1);
            }
        }
        ImageSpans { spans }
    }

    /// The image whose pads strictly straddle `cut` (some before it, some from it on).
    fn straddling(&self, cut: usize) -> Option<&Range<usize>> {
        self.spans.iter().find(|s| s.start < cut && cut < s.end)
    }

    /// The smallest cut `>= cut` that splits no image.
    pub(super) fn cut_at_or_after(&self, cut: usize) -> usize {
        self.straddling(cut).map_or(cut, |s| s.end)
    }

    /// The images with pads in `ids[a..b]`, and how many pads of the first lie before `a`.
    pub(super) fn images_in(&self, a: usize, b: usize) -> (Range<usize>, usize) {
        let first = self.spans.iter().take_while(|s| s.end <= a).count();
        let past = self.spans.iter().take_while(|s| s.start < b).count();
        let skip = self
            .spans
            .get(first)
            .filter(|s| s.start < a && first < past)
            .map_or(0, |s| a - s.start);
        (first..past.max(first), skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: u32 = 9;

    /// text 0..3, image 0 at 3..7, text 7..9, image 1 at 9..11, text 11..
    fn prompt() -> (Vec<u32>, ImageSpans) {
        let ids = vec![1, 2, 3, PAD, PAD, PAD, PAD, 4, 5, PAD, PAD, 6, 7];
        let spans = ImageSpans::of(&ids, PAD, &[4, 2]);
        (ids, spans)
    }

    #[test]
    fn spans_follow_the_pads_in_order() {
        let (_, s) = prompt();
        assert_eq!(s.spans, vec![3..7, 9..11]);
        // Two images back to back: the counts split the run.
        let s = ImageSpans::of(&[1, PAD, PAD, PAD, 2], PAD, &[1, 2]);
        assert_eq!(s.spans, vec![1..2, 2..4]);
    }

    #[test]
    fn pieces_never_end_inside_an_image() {
        let (ids, s) = prompt();
        for cut in 0..=ids.len() {
            let after = s.cut_at_or_after(cut);
            assert!(cut <= after, "{cut}: {after}");
            assert!(s.straddling(after).is_none(), "{cut} -> {after}");
        }
        assert_eq!(s.cut_at_or_after(5), 7);
        assert_eq!(s.cut_at_or_after(3), 3);
        assert_eq!(s.cut_at_or_after(7), 7);
        assert_eq!(s.cut_at_or_after(10), 11);
    }

    #[test]
    fn images_in_a_piece() {
        let (ids, s) = prompt();
        assert_eq!(s.images_in(0, ids.len()), (0..2, 0));
        assert_eq!(s.images_in(0, 3), (0..0, 0));
        assert_eq!(s.images_in(0, 7), (0..1, 0));
        assert_eq!(s.images_in(7, 9), (1..1, 0));
        assert_eq!(s.images_in(7, 13), (1..2, 0));
        assert_eq!(s.images_in(11, 13), (2..2, 0));
        // A piece that starts inside an image takes its rows from there on.
        assert_eq!(s.images_in(5, 7), (0..1, 2));
        assert_eq!(s.images_in(4, 13), (0..2, 1));
        assert_eq!(s.images_in(10, 11), (1..2, 1));
    }
}
