// TAP interfaces (/dev/net/tun): the ioctls and flags of <linux/if_tun.h>
// and <linux/if.h>, whose macros and struct ifreq do not import into Swift.
// Every function returns 0 (or a descriptor) on success, -1 with errno set.
#ifndef CTAP_H
#define CTAP_H
#include <stddef.h>
#include <stdint.h>

/// Offload bits for CTap_set_offload (TUN_F_*): what the kernel may hand us.
enum {
    CTAP_F_CSUM = 0x01,
    CTAP_F_TSO4 = 0x02,
    CTAP_F_TSO6 = 0x04,
    CTAP_F_TSO_ECN = 0x08,
};

/// Opens one queue of the TAP interface `name` (IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR, plus IFF_MULTI_QUEUE when `multi_queue`), non-blocking and
/// close-on-exec. It attaches to the existing interface when the caller is its
/// owner or in its group (or has CAP_NET_ADMIN); when there is none, the kernel
/// creates it if `may_create` and the caller may (CAP_NET_ADMIN), else this
/// fails with ENODEV. `created` (may be NULL) tells whether the interface is
/// new; `actual` (IFNAMSIZ bytes, may be NULL) receives the kernel's name for it.
int CTap_open(const char *name, int multi_queue, int may_create, int *created, char *actual);
/// TUNSETVNETHDRSZ: the virtio-net header size in front of every frame (10 or 12).
int CTap_set_vnet_hdr_size(int fd, int size);
/// TUNSETOFFLOAD with CTAP_F_* bits.
int CTap_set_offload(int fd, unsigned flags);
/// TUNSETPERSIST 0: the interface goes away when its last queue closes.
int CTap_set_persist(int fd, int persist);
/// The interface's flags (SIOCGIFFLAGS), or -1 with errno (ENODEV: gone).
int CTap_get_flags(const char *name);
/// The interface's MTU (SIOCGIFMTU), or -1 with errno.
int CTap_get_mtu(const char *name);
/// Sets its MTU (SIOCSIFMTU: needs CAP_NET_ADMIN).
int CTap_set_mtu(const char *name, int mtu);
/// IFF_UP, for CTap_get_flags.
int CTap_flag_up(void);
/// IFF_RUNNING (carrier: a queue is attached).
int CTap_flag_running(void);
#endif
