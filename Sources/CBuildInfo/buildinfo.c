#include "CBuildInfo.h"

#ifndef IOTLBD_COMMIT
#define IOTLBD_COMMIT "unknown"
#endif

const char *CBuildInfo_commit(void) { return IOTLBD_COMMIT; }
