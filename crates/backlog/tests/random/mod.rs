//! A small xorshift generator for the kill tests. The tests seed it from the
//! clock, so the kill points vary from run to run, and print the seed, so a
//! failing run's kill points can be replayed by seeding with it.

/// An xorshift64 generator. The seed must not be 0.
pub struct Random(pub u64);

impl Random {
    /// Returns the next number below `bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}
