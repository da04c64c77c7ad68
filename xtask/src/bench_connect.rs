use anyhow::Result;
pub fn run(_connects: u32) -> Result<()> {
    anyhow::bail!("not yet")
}
