//! Small DATA frames of one stream that reach an upstream connection in the same turn leave as
//! one frame.
//!
//! Why: h2 endpoints (tonic, hyper) keep a per-connection budget for DATA frames under 256
//! bytes that their application has not read yet, and close the connection with GOAWAY
//! ENHANCE_YOUR_CALM once it is spent (about 130 one-byte frames with a 64 KiB window). An
//! upstream connection carries many clients' streams, so a client sending a flood of tiny
//! frames, or an endpoint slow to read a busy stream's small messages, would end every call
//! on it. Frames that arrive together are joined; each join copies the small frame (under 256
//! bytes) once. Frames that arrive one per turn still go one by one.

use bytes::{Bytes, BytesMut};
use h2::frame;

use super::ToUpstream;

/// Frames under this many bytes are joined to the frame before them (h2's threshold).
const SMALL: usize = 256;
/// A joined frame stays within the smallest SETTINGS_MAX_FRAME_SIZE a peer may announce.
const MAX_JOINED: usize = 16_384;

/// Joins, in place, each run of small DATA frames of one stream (the run ends at its
/// END_STREAM, at any other message, or at `MAX_JOINED` bytes). Allocates only when something
/// is joined.
pub(crate) fn small_data(msgs: &mut Vec<ToUpstream>) {
    if !msgs.windows(2).any(|w| joinable(&w[0], &w[1])) {
        return;
    }
    let mut out: Vec<ToUpstream> = Vec::with_capacity(msgs.len());
    // The run being joined: its first frame's head (id, END_STREAM) and the bytes so far.
    let mut run: Option<(frame::Data<Bytes>, BytesMut)> = None;
    for m in msgs.drain(..) {
        if let Some((head, buf)) = &mut run {
            match &m {
                ToUpstream::Data(d)
                    if d.stream_id() == head.stream_id()
                        && d.payload().len() < SMALL
                        && buf.len() + d.payload().len() <= MAX_JOINED =>
                {
                    buf.extend_from_slice(d.payload());
                    let eos = d.is_end_stream();
                    head.set_end_stream(eos);
                    if eos {
                        out.push(finish(run.take()));
                    }
                    continue;
                }
                _ => out.push(finish(run.take())),
            }
        }
        match m {
            ToUpstream::Data(d) if !d.is_end_stream() && d.payload().len() < SMALL => {
                let mut buf = BytesMut::with_capacity(4 * SMALL);
                buf.extend_from_slice(d.payload());
                run = Some((d, buf));
            }
            other => out.push(other),
        }
    }
    if run.is_some() {
        out.push(finish(run.take()));
    }
    *msgs = out;
}

fn joinable(a: &ToUpstream, b: &ToUpstream) -> bool {
    matches!((a, b), (ToUpstream::Data(a), ToUpstream::Data(b))
        if a.stream_id() == b.stream_id()
            && !a.is_end_stream()
            && a.payload().len() < SMALL
            && b.payload().len() < SMALL)
}

fn finish(run: Option<(frame::Data<Bytes>, BytesMut)>) -> ToUpstream {
    let (head, buf) = run.expect("a run is open");
    let mut d = frame::Data::new(head.stream_id(), buf.freeze());
    d.set_end_stream(head.is_end_stream());
    ToUpstream::Data(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use h2::frame::StreamId;
    use h2::Reason;

    fn data(id: u32, payload: &[u8], eos: bool) -> ToUpstream {
        let mut d = frame::Data::new(StreamId::from(id), Bytes::copy_from_slice(payload));
        d.set_end_stream(eos);
        ToUpstream::Data(d)
    }

    /// (stream, payload, END_STREAM) per DATA frame; `None` for anything else.
    fn shape(msgs: &[ToUpstream]) -> Vec<Option<(u32, Vec<u8>, bool)>> {
        msgs.iter()
            .map(|m| match m {
                ToUpstream::Data(d) => Some((
                    d.stream_id().into(),
                    d.payload().to_vec(),
                    d.is_end_stream(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_run_of_small_frames_of_one_stream_becomes_one_frame_and_keeps_its_end() {
        let mut msgs: Vec<ToUpstream> = (0..200u8).map(|i| data(1, &[i], false)).collect();
        msgs.push(data(1, b"end", true));
        small_data(&mut msgs);
        let mut want: Vec<u8> = (0..200u8).collect();
        want.extend_from_slice(b"end");
        assert_eq!(shape(&msgs), vec![Some((1, want, true))]);
    }

    #[test]
    fn other_streams_other_messages_and_ended_frames_break_a_run() {
        let mut msgs = vec![
            data(1, b"a", false),
            data(1, b"b", false),
            data(3, b"c", false),
            data(1, b"d", false),
            ToUpstream::Reset(StreamId::from(5), Reason::CANCEL),
            data(1, b"e", true),
            data(1, b"f", false),
        ];
        small_data(&mut msgs);
        assert_eq!(
            shape(&msgs),
            vec![
                Some((1, b"ab".to_vec(), false)),
                Some((3, b"c".to_vec(), false)),
                Some((1, b"d".to_vec(), false)),
                None,
                Some((1, b"e".to_vec(), true)),
                Some((1, b"f".to_vec(), false)),
            ]
        );
    }

    #[test]
    fn large_frames_are_not_copied_and_joins_stop_at_the_frame_size_limit() {
        let big = vec![7u8; 1000];
        let mut msgs = vec![data(1, &big, false), data(1, &big, false)];
        small_data(&mut msgs);
        assert_eq!(msgs.len(), 2, "frames of 256 bytes or more are left alone");

        let sizes = |msgs: &[ToUpstream]| -> Vec<usize> {
            shape(msgs)
                .into_iter()
                .map(|s| s.expect("data").1.len())
                .collect()
        };
        let mut msgs = vec![data(1, &vec![1u8; 10_000], false)];
        msgs.extend((0..20).map(|_| data(1, b"x", false)));
        small_data(&mut msgs);
        assert_eq!(
            sizes(&msgs),
            vec![10_000, 20],
            "a large frame starts no run"
        );

        let mut msgs: Vec<ToUpstream> = (0..100).map(|_| data(1, &[2u8; 200], false)).collect();
        small_data(&mut msgs);
        assert_eq!(
            sizes(&msgs),
            vec![81 * 200, 19 * 200],
            "joins stop at {MAX_JOINED} bytes"
        );
    }

    #[test]
    fn nothing_to_join_leaves_the_messages_as_they_were() {
        let mut msgs = vec![data(1, b"a", false), data(3, b"b", true)];
        small_data(&mut msgs);
        assert_eq!(
            shape(&msgs),
            vec![
                Some((1, b"a".to_vec(), false)),
                Some((3, b"b".to_vec(), true))
            ]
        );
    }
}
