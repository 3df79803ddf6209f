// jansson, as Swift sees it. Nothing is added: json_t is a complete struct, so
// Swift reads its `type` field instead of the json_is_* macros.
#include <jansson.h>
