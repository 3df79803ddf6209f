// What build this is, for iotlbd_build_info and --version.
import CBuildInfo

/// The daemon's version and the commit it was built from.
public enum BuildInfo {
    /// The release this tree is (semantic versioning).
    public static let version = "0.3.0"
    /// The git commit of the build, or "unknown".
    public static let commit = String(cString: CBuildInfo_commit())
}
