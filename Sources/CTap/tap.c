#define _GNU_SOURCE
#include "CTap.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

// From <net/if.h>, which clashes with <linux/if.h>.
extern unsigned int if_nametoindex(const char *ifname);

static int fill_name(struct ifreq *ifr, const char *name) {
    memset(ifr, 0, sizeof *ifr);
    size_t n = strlen(name);
    if (n == 0 || n >= IFNAMSIZ) { errno = EINVAL; return -1; }
    memcpy(ifr->ifr_name, name, n);
    return 0;
}

int CTap_open(const char *name, int multi_queue, int may_create, int *created, char *actual) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0) return -1;
    // Whether it existed: TUNSETIFF creates silently, the caller wants to know (and may not want one made).
    int existed = if_nametoindex(name) != 0;
    if (!existed && !may_create) { errno = ENODEV; return -1; }
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1;
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multi_queue ? IFF_MULTI_QUEUE : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (created) *created = !existed;
    if (actual) memcpy(actual, ifr.ifr_name, IFNAMSIZ);
    return fd;
}

int CTap_set_vnet_hdr_size(int fd, int size) { return ioctl(fd, TUNSETVNETHDRSZ, &size); }

int CTap_set_offload(int fd, unsigned flags) {
    unsigned long f = 0;
    if (flags & CTAP_F_CSUM) f |= TUN_F_CSUM;
    if (flags & CTAP_F_TSO4) f |= TUN_F_TSO4;
    if (flags & CTAP_F_TSO6) f |= TUN_F_TSO6;
    if (flags & CTAP_F_TSO_ECN) f |= TUN_F_TSO_ECN;
    return ioctl(fd, TUNSETOFFLOAD, f);
}

int CTap_set_persist(int fd, int persist) { return ioctl(fd, TUNSETPERSIST, (unsigned long)persist); }

// An interface ioctl on a throw-away socket; `ifr` holds the name already.
static int ifreq_ioctl(unsigned long req, struct ifreq *ifr) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    int r = ioctl(s, req, ifr);
    int e = errno;
    close(s);
    errno = e;
    return r;
}

int CTap_get_flags(const char *name) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0 || ifreq_ioctl(SIOCGIFFLAGS, &ifr) < 0) return -1;
    return ifr.ifr_flags & 0xffff;
}

int CTap_get_mtu(const char *name) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0 || ifreq_ioctl(SIOCGIFMTU, &ifr) < 0) return -1;
    return ifr.ifr_mtu;
}

int CTap_set_mtu(const char *name, int mtu) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) < 0) return -1;
    ifr.ifr_mtu = mtu;
    return ifreq_ioctl(SIOCSIFMTU, &ifr);
}

int CTap_flag_up(void) { return IFF_UP; }
int CTap_flag_running(void) { return IFF_RUNNING; }
