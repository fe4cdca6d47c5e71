pub mod worker;
pub mod harness;
pub mod video_track;
