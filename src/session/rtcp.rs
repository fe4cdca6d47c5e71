// Keyframe requests from the server reach the sink. webrtc-rs 0.21.1 ends
// inbound RTCP at the end of its interceptor chain unless an interceptor
// marks a packet for the application; this one marks PLI and FIR (the
// server asks for a keyframe when it cannot decode: a lost keyframe), which
// webrtc-rs then hands to the sent track as `TrackLocalEvent::OnRtcpPacket`.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use webrtc::peer_connection::Registry;

/// Adds the marker last in the chain (application-most): the interceptors
/// that act on RTCP (NACK, reports) have seen every packet by then.
pub fn with_keyframe_requests(registry: Registry) -> Registry {
    registry.with(Slot::from(14_000), KeyframeRequests::default())
}

/// True when `packets` ask for a keyframe.
pub fn asks_for_keyframe(packets: &[Box<dyn rtc::rtcp::Packet>]) -> bool {
    packets.iter().any(|packet| is_keyframe_request(packet.as_ref()))
}

fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    packet.as_any().is::<PictureLossIndication>() || packet.as_any().is::<FullIntraRequest>()
}

#[derive(Default)]
struct KeyframeRequests {
    inbound: VecDeque<TaggedPacket>,
    outbound: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut message: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &message.message.packet {
            // Only the requests go on to the application, by their media SSRC.
            let requests: Vec<Box<dyn rtc::rtcp::Packet>> =
                packets.iter().filter(|packet| is_keyframe_request(packet.as_ref())).cloned().collect();
            if !requests.is_empty() {
                message.message.packet = Packet::Rtcp(requests);
                message.message.add(Attribute::DeliverToApplication);
            }
        }
        self.inbound.push_back(message);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.inbound.pop_front()
    }

    fn handle_write(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        self.outbound.push_back(message);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.outbound.pop_front()
    }
}

impl Interceptor for KeyframeRequests {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
