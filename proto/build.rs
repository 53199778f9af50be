fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/ipam.proto"], &["proto"])?;
    tonic_prost_build::configure().compile_protos(&["proto/nics.proto"], &["proto"])?;
    Ok(())
}
