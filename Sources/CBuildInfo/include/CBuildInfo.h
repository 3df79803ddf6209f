// The git commit this build came from. Swift cannot take a value from the
// command line (-D only sets flags), so Package.swift defines it for this
// one C file from the package's git information.
#ifndef CBUILDINFO_H
#define CBUILDINFO_H

/// The commit (12 hex digits), or "unknown" outside a git checkout.
const char *CBuildInfo_commit(void);

#endif
