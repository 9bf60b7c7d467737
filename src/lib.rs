pub mod engine;
pub mod template;
