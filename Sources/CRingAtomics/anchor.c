// Header-only: see include/CRingAtomics.h.
