pub mod worker;
pub mod harness;
pub mod live;
pub mod video_track;
pub mod cameras;
pub mod results;
pub mod regions;
