pub mod harness;
pub mod video_track;
pub mod worker;
