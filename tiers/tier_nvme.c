// SPDX-License-Identifier: MIT
/*
 * NVMe tier: a store on a file or block device opened O_DIRECT, driven by io_uring
 * with registered buffers and a registered file. Layout: a superblock in the first
 * 4 KiB, then nslots slots of slot_size bytes from data_off; each slot is a header
 * block and the payload. The header block is the file system's block (4 KiB on ext4)
 * where pages are whole blocks, so a payload is whole blocks too and a read of a page
 * whose checksum the store remembers moves the payload alone; otherwise it is the
 * device's direct-I/O alignment (at least 512), as in stores made before. The header
 * goes to and from one of the tier's own buffers (one per io in flight), the payload
 * to and from the caller's buffer, in one vectored io: host RAM holds payloads alone.
 * Pages are verified on every read (page_format.h). An OFD lock keeps a second process
 * (or a second open in this one) off the store. A freed slot is wiped (its header
 * block zeroed) before it can be handed out again, so a restart never brings back a
 * dropped page; a slot whose write failed is poisoned, never trusted again.
 */
#include "tier.h"
#include "slots.h"
#include "daemon/alloc.h"
#include "daemon/log.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/stat.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#define SUPER_MAGIC   0x31524f545354564bull /* "KVTSTOR1" */
#define SUPER_VERSION 1
#define SUPER_SIZE    4096u
#define DATA_OFF      (1u << 20)

struct nvme_super {
	uint64_t magic;
	uint32_t version;
	uint32_t hdr_size;
	uint32_t page_bytes;
	uint32_t slot_size;
	uint64_t nslots;
	uint64_t data_off;
	uint64_t created_ns;
	uint64_t csum;
};
_Static_assert(sizeof(struct nvme_super) == 56, "superblock is a disk format");

struct nvme_tier {
	struct tier base;
	int fd;
	int file_index; /* fixed file, or -1 */
	bool blockdev;
	bool formatted_now;
	uint32_t hdr_size;
	uint32_t walign; /* writes span whole blocks of this: ext4 serializes unaligned DIO */
	bool payload_reads; /* hdr_size is whole blocks: a payload can be read alone */
	uint32_t slot_size;
	uint64_t nslots;
	uint64_t data_off;
	struct slot_pool pool;
	unsigned qd, bg_qd; /* in flight at most: all, those not urgent */
	unsigned inflight, bg_inflight;
	struct kvt_list pending; /* ios waiting for a queue slot */
	struct kvt_list urgent;  /* those of them that are urgent: started first */
	void *zero;              /* hdr_size zero bytes, aligned: the wipe */
	char *hbufs;             /* qd headers of hdr_size: one per io under way */
	struct iovec *iov;       /* two per header buffer: header, payload */
	uint32_t *hfree;         /* header buffers free (a stack) */
	unsigned nhfree;
	unsigned wipes_inflight;
	uint64_t reads, writes, read_bytes, write_bytes, wipes;
	uint64_t err[TIER_ERR_MAX];
};

const char *tier_err_name(enum tier_err e)
{
	static const char *const n[TIER_ERR_MAX] = {
		[TIER_ERR_IO] = "io",
		[TIER_ERR_SHORT] = "short",
		[TIER_ERR_CORRUPT] = "checksum",
		[TIER_ERR_STALE] = "stale",
		[TIER_ERR_EMPTY] = "empty",
	};
	return (unsigned)e < TIER_ERR_MAX ? n[e] : "?";
}

static uint64_t super_csum(const struct nvme_super *s)
{
	return XXH3_64bits(s, offsetof(struct nvme_super, csum));
}

static uint64_t slot_off(const struct nvme_tier *n, uint64_t idx)
{
	return n->data_off + idx * n->slot_size;
}

static uint32_t dio_alignment(int fd, bool blockdev)
{
#ifdef STATX_DIOALIGN
	struct statx stx;
	if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
	    (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align)
		return stx.stx_dio_offset_align;
#endif
	int ss;
	if (blockdev && ioctl(fd, BLKSSZGET, &ss) == 0 && ss > 0)
		return (uint32_t)ss;
	return 4096;
}

static int read_super(struct nvme_tier *n, struct nvme_super *out, bool *present)
{
	void *buf;
	if (posix_memalign(&buf, 4096, SUPER_SIZE))
		return -ENOMEM;
	ssize_t r = pread(n->fd, buf, SUPER_SIZE, 0);
	int ret = 0;
	*present = false;
	if (r < 0) {
		ret = -errno;
	} else if (r == SUPER_SIZE) {
		memcpy(out, buf, sizeof(*out));
		*present = out->magic == SUPER_MAGIC;
		if (*present && (out->version != SUPER_VERSION || super_csum(out) != out->csum))
			ret = -EUCLEAN;
	}
	free(buf);
	return ret;
}

static int write_super(struct nvme_tier *n, const struct nvme_super *s)
{
	void *buf;
	if (posix_memalign(&buf, 4096, SUPER_SIZE))
		return -ENOMEM;
	memset(buf, 0, SUPER_SIZE);
	memcpy(buf, s, sizeof(*s));
	ssize_t r = pwrite(n->fd, buf, SUPER_SIZE, 0);
	free(buf);
	if (r != SUPER_SIZE)
		return r < 0 ? -errno : -EIO;
	return fdatasync(n->fd) < 0 ? -errno : 0;
}

static int nvme_format(struct nvme_tier *n, uint64_t capacity, uint64_t devsize)
{
	const struct tier_params *p = &n->base.p;
	uint64_t nslots = capacity / p->page_bytes;
	if (n->blockdev) {
		uint64_t fit = devsize > DATA_OFF ? (devsize - DATA_OFF) / n->slot_size : 0;
		if (!nslots || nslots > fit)
			nslots = fit;
	}
	if (!nslots)
		return -ENOSPC;
	if (!n->blockdev) {
		/*
		 * Reserve the blocks now: a full disk shows at open, not mid-write. But ask
		 * the filesystem first: ext4's fallocate takes every free block before it
		 * fails, and what it took stays allocated (a disk left full, the daemon's
		 * own log unwritable).
		 */
		const uint64_t want = DATA_OFF + nslots * n->slot_size;
		struct stat st;
		struct statvfs vs;
		if (fstat(n->fd, &st) < 0)
			return -errno;
		if (fstatvfs(n->fd, &vs) == 0) {
			const uint64_t have = (uint64_t)vs.f_bavail * vs.f_frsize +
					      (uint64_t)st.st_blocks * 512;
			if (want > have) {
				kvt_err("nvme", "%s: %.2f GiB asked (%llu slots of %u bytes), %.2f GiB "
						"free on its filesystem",
					p->path, (double)want / (1 << 30), (unsigned long long)nslots,
					n->slot_size, (double)have / (1 << 30));
				return -ENOSPC;
			}
		}
		int r = fallocate(n->fd, 0, 0, (off_t)want);
		if (r < 0 && errno != EOPNOTSUPP) {
			r = -errno;
			/* give back what a failed fallocate took beyond the file's old end */
			if (ftruncate(n->fd, st.st_size) < 0)
				kvt_warn("nvme", "%s: truncate back to %lld bytes: %s", p->path,
					 (long long)st.st_size, strerror(errno));
			return r;
		}
		if (r < 0 && ftruncate(n->fd, (off_t)want) < 0)
			return -errno;
	}
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	struct nvme_super s = {
		.magic = SUPER_MAGIC,
		.version = SUPER_VERSION,
		.hdr_size = n->hdr_size,
		.page_bytes = p->page_bytes,
		.slot_size = n->slot_size,
		.nslots = nslots,
		.data_off = DATA_OFF,
		.created_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec,
	};
	s.csum = super_csum(&s);
	int ret = write_super(n, &s);
	if (ret < 0)
		return ret;
	n->nslots = nslots;
	n->data_off = DATA_OFF;
	n->formatted_now = true;
	return 0;
}

static void nvme_close(struct tier *t);

static int nvme_open(struct tier **out, const struct tier_params *p)
{
	if (!p->path || !p->loop || !p->page_bytes)
		return -EINVAL;
	struct nvme_tier *n = kvt_calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->base.ops = &tier_nvme_ops;
	n->base.p = *p;
	n->file_index = -1;
	n->qd = p->queue_depth ? p->queue_depth : 64;
	n->bg_qd = p->bg_depth && p->bg_depth < n->qd ? p->bg_depth : n->qd;
	kvt_list_init(&n->pending);
	kvt_list_init(&n->urgent);
	int ret;
	n->fd = open(p->path, O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
	if (n->fd < 0) {
		ret = -errno;
		kvt_err("nvme", "open %s: %s", p->path, strerror(errno));
		goto fail;
	}
	/*
	 * An OFD lock belongs to this open file description, so it also keeps a second
	 * open in this process off, and it goes away with the last fd, even on kill -9.
	 */
	struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
	int lr;
	/*
	 * A process killed with the store open holds it until the kernel tears its
	 * io_uring down (asynchronously, after exit): allow that a second.
	 */
	for (int i = 0; (lr = fcntl(n->fd, F_OFD_SETLK, &fl)) < 0 && i < 100 &&
			(errno == EAGAIN || errno == EACCES);
	     i++)
		usleep(10000);
	if (lr < 0) {
		ret = (errno == EAGAIN || errno == EACCES) ? -EBUSY : -errno;
		kvt_err("nvme", "%s: %s", p->path,
			ret == -EBUSY ? "in use by another kvtier store (locked)" : strerror(errno));
		goto fail;
	}
	struct stat st;
	if (fstat(n->fd, &st) < 0) {
		ret = -errno;
		goto fail;
	}
	uint64_t devsize = (uint64_t)st.st_size;
	n->blockdev = S_ISBLK(st.st_mode);
	if (n->blockdev && ioctl(n->fd, BLKGETSIZE64, &devsize) < 0) {
		ret = -errno;
		goto fail;
	}
	uint32_t align = dio_alignment(n->fd, n->blockdev);
	const uint32_t min_hdr = align > 512 ? align : 512;
	int pbs = 0;
	uint32_t blk = (uint32_t)st.st_blksize;
	if (n->blockdev && ioctl(n->fd, BLKPBSZGET, &pbs) == 0 && pbs > 0)
		blk = (uint32_t)pbs;
	if (blk < min_hdr || blk > (1u << 20) || blk % min_hdr)
		blk = min_hdr;
	n->walign = blk;
	/*
	 * A whole block of header where the pages are whole blocks: the slot is no larger
	 * (header and payload round up to the same blocks) and reads can leave the header
	 * out (fio on the development machine's disk: 32 KiB reads run ~10% more IOPS than
	 * 36 KiB ones).
	 */
	n->hdr_size = p->page_bytes % blk == 0 ? blk : min_hdr;
	n->slot_size = (n->hdr_size + p->page_bytes + blk - 1) / blk * blk;

	struct nvme_super s;
	bool present;
	ret = read_super(n, &s, &present);
	if (ret == -EUCLEAN) {
		kvt_err("nvme", "%s: superblock damaged or of another version; not touching it",
			p->path);
		goto fail;
	}
	if (ret < 0)
		goto fail;
	if (present) {
		if (s.page_bytes != p->page_bytes || s.hdr_size < min_hdr || s.hdr_size % min_hdr) {
			kvt_err("nvme", "%s was made for %u-byte pages with %u-byte headers, "
					"asked for %u-byte pages",
				p->path, s.page_bytes, s.hdr_size, p->page_bytes);
			ret = -EINVAL;
			goto fail;
		}
		n->hdr_size = s.hdr_size;
		n->slot_size = s.slot_size;
		if (n->slot_size % n->walign)
			n->walign = n->hdr_size;
		n->nslots = s.nslots;
		n->data_off = s.data_off;
		if (n->data_off + n->nslots * n->slot_size > devsize) {
			kvt_err("nvme", "%s: shorter than its superblock says", p->path);
			ret = -EUCLEAN;
			goto fail;
		}
	} else {
		ret = nvme_format(n, p->capacity, devsize);
		if (ret < 0) {
			kvt_err("nvme", "format %s for %llu bytes: %s", p->path,
				(unsigned long long)p->capacity, strerror(-ret));
			goto fail;
		}
	}
	if (n->nslots > UINT32_MAX) {
		ret = -EFBIG;
		goto fail;
	}
	ret = slot_pool_init(&n->pool, (uint32_t)n->nslots);
	if (ret < 0)
		goto fail;
	if (posix_memalign(&n->zero, 4096, n->hdr_size)) {
		ret = -ENOMEM;
		goto fail;
	}
	memset(n->zero, 0, n->hdr_size);
	n->hfree = kvt_calloc(n->qd, sizeof(*n->hfree));
	n->iov = kvt_calloc(2 * (size_t)n->qd, sizeof(*n->iov));
	if (!n->hfree || !n->iov ||
	    posix_memalign((void **)&n->hbufs, 4096, (size_t)n->qd * n->hdr_size)) {
		ret = -ENOMEM;
		goto fail;
	}
	for (unsigned i = 0; i < n->qd; i++)
		n->hfree[n->nhfree++] = n->qd - 1 - i;
	n->payload_reads = n->hdr_size % n->walign == 0;
	n->file_index = kvt_loop_register_file(p->loop, n->fd);
	if (n->file_index < 0)
		kvt_warn("nvme", "file not registered with io_uring: %s", strerror(-n->file_index));
	kvt_info("nvme", "%s: %s store, %llu slots of %u bytes (header %u, block %u), qd %u",
		 p->path, present ? "existing" : "new", (unsigned long long)n->nslots,
		 n->slot_size, n->hdr_size, n->walign, n->qd);
	*out = &n->base;
	return 0;
fail:
	nvme_close(&n->base);
	return ret;
}

static void nvme_drain(struct nvme_tier *n)
{
	while (n->inflight || n->wipes_inflight)
		kvt_loop_run(n->base.p.loop, 1, 100);
}

static void nvme_close(struct tier *t)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	if (n->base.p.loop && n->fd >= 0)
		nvme_drain(n);
	if (n->file_index >= 0)
		kvt_loop_unregister_file(t->p.loop, n->file_index);
	if (n->fd >= 0)
		close(n->fd);
	slot_pool_destroy(&n->pool);
	free(n->zero);
	free(n->hbufs);
	kvt_free(n->iov);
	kvt_free(n->hfree);
	kvt_free(n);
}

static int nvme_alloc(struct tier *t, uint32_t tenant, tier_slot_t *out)
{
	(void)tenant;
	struct nvme_tier *n = (struct nvme_tier *)t;
	uint32_t idx;
	int ret = slot_pool_alloc(&n->pool, &idx);
	if (ret == 0)
		*out = TIER_SLOT(0, idx);
	return ret;
}

struct wipe {
	struct kvt_op op;
	struct nvme_tier *n;
	uint32_t idx;
};

/* The file (registered or not) an io's sqe names. */
static int io_fd(const struct nvme_tier *n)
{
	return n->file_index >= 0 ? n->file_index : n->fd;
}

/* What every io's sqe carries besides its buffers: the registered file, a write's sync. */
static void prep_flags(const struct nvme_tier *n, struct io_uring_sqe *sqe, bool write)
{
	if (n->file_index >= 0)
		sqe->flags |= IOSQE_FIXED_FILE;
	if (write && n->base.p.durable)
		sqe->rw_flags = RWF_DSYNC;
}

static void prep_rw(struct nvme_tier *n, struct io_uring_sqe *sqe, bool write, void *buf,
		    unsigned len, uint64_t off, int buf_index)
{
	const int fd = io_fd(n);
	if (buf_index >= 0 && write)
		io_uring_prep_write_fixed(sqe, fd, buf, len, off, buf_index);
	else if (buf_index >= 0)
		io_uring_prep_read_fixed(sqe, fd, buf, len, off, buf_index);
	else if (write)
		io_uring_prep_write(sqe, fd, buf, len, off);
	else
		io_uring_prep_read(sqe, fd, buf, len, off);
	prep_flags(n, sqe, write);
}

/* A slot's header from or to iov[0] (a header buffer), its payload iov[1]. */
static void prep_rwv(struct nvme_tier *n, struct io_uring_sqe *sqe, bool write,
		     const struct iovec *iov, uint64_t off)
{
	if (write)
		io_uring_prep_writev(sqe, io_fd(n), iov, 2, off);
	else
		io_uring_prep_readv(sqe, io_fd(n), iov, 2, off);
	prep_flags(n, sqe, write);
}

static void wipe_done(struct kvt_op *op, int res, uint32_t flags)
{
	(void)flags;
	struct wipe *w = kvt_container_of(op, struct wipe, op);
	struct nvme_tier *n = w->n;
	n->wipes_inflight--;
	if (res != (int)n->hdr_size) {
		/* Whatever is on that slot can no longer be told apart: never reuse it. */
		n->err[res < 0 ? TIER_ERR_IO : TIER_ERR_SHORT]++;
		slot_pool_poison(&n->pool, w->idx);
		kvt_warn("nvme", "wipe of slot %u failed (%s): slot poisoned", w->idx,
			 res < 0 ? strerror(-res) : "short write");
	} else {
		n->wipes++;
		slot_pool_free(&n->pool, w->idx);
	}
	kvt_free(w);
}

static void nvme_free(struct tier *t, tier_slot_t s)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	uint32_t idx = (uint32_t)TIER_SLOT_INDEX(s);
	if (TIER_SLOT_ARENA(s) != 0 || idx >= n->pool.nslots || n->pool.state[idx] != SLOT_USED) {
		kvt_err("nvme", "free of slot %llx not in use", (unsigned long long)s);
		return;
	}
	struct wipe *w = kvt_malloc(sizeof(*w));
	if (!w) {
		slot_pool_poison(&n->pool, idx); /* cannot wipe: keep it out of use */
		return;
	}
	w->op.fn = wipe_done;
	w->n = n;
	w->idx = idx;
	n->wipes_inflight++;
	struct io_uring_sqe *sqe = kvt_loop_sqe(t->p.loop, &w->op);
	prep_rw(n, sqe, true, n->zero, n->hdr_size, slot_off(n, idx), -1);
}

static void nvme_poison(struct tier *t, tier_slot_t s)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	slot_pool_poison(&n->pool, (uint32_t)TIER_SLOT_INDEX(s));
}

static void *nvme_slot_ptr(struct tier *t, tier_slot_t s)
{
	(void)t;
	(void)s;
	return NULL;
}

/*
 * Reads and writes cover whole file-system blocks: a partial-block O_DIRECT write is
 * serialized by ext4 and read-modified-written by 4Kn devices, and a read that ends
 * inside a block costs the device a block anyway (fio at 32.5 KiB: 10-15% fewer IOPS
 * than at 36 KiB on the development machine's disk).
 */
static uint32_t io_bytes(const struct nvme_tier *n, uint32_t len)
{
	return (n->hdr_size + len + n->walign - 1) / n->walign * n->walign;
}

static void io_complete(struct kvt_op *op, int res, uint32_t flags);

/* tier_io.rd: the whole slot; the payload alone; the whole slot after the payload alone
 * failed its check */
enum { RD_SLOT, RD_PAYLOAD, RD_AGAIN };

#define HB_NONE UINT32_MAX

static void start_io(struct nvme_tier *n, struct tier_io *io)
{
	struct kvt_loop *loop = n->base.p.loop;
	bool write = io->dir == TIER_WRITE;
	uint64_t off = slot_off(n, TIER_SLOT_INDEX(io->slot));
	uint32_t bytes = io_bytes(n, io->len);
	io->op.fn = io_complete;
	io->issue_ns = tier_now_ns();
	n->inflight++;
	io->hb = HB_NONE;
	/* the payload alone where the store knows the checksum (not again when a check of
	 * the payload alone has failed: then the header says why) */
	if (!write && io->rd == RD_SLOT && io->meta.csum && n->payload_reads) {
		io->rd = RD_PAYLOAD;
		io->xfer = (io->len + n->walign - 1) / n->walign * n->walign;
		int bi = kvt_loop_buffer_index(loop, io->buf, io->xfer);
		prep_rw(n, kvt_loop_sqe(loop, &io->op), false, io->buf, io->xfer,
			off + n->hdr_size, bi);
		return;
	}
	/* never empty: an io takes one only while fewer than qd are under way */
	io->hb = n->hfree[--n->nhfree];
	char *hdr = n->hbufs + (size_t)io->hb * n->hdr_size;
	struct iovec *iov = &n->iov[2 * (size_t)io->hb];
	iov[0] = (struct iovec){.iov_base = hdr, .iov_len = n->hdr_size};
	iov[1] = (struct iovec){.iov_base = io->buf, .iov_len = bytes - n->hdr_size};
	if (write)
		io->meta.csum =
			page_hdr_stamp(hdr, (uint16_t)n->hdr_size, io->buf, &io->meta, io->slot);
	io->xfer = bytes;
	prep_rwv(n, kvt_loop_sqe(loop, &io->op), write, iov, off);
}

static void start_pending(struct nvme_tier *n)
{
	while (n->inflight < n->qd && !kvt_list_empty(&n->urgent)) {
		struct tier_io *io = kvt_list_first(&n->urgent, struct tier_io, qlink);
		kvt_list_del(&io->qlink);
		start_io(n, io);
	}
	while (n->inflight < n->qd && n->bg_inflight < n->bg_qd && !kvt_list_empty(&n->pending)) {
		struct tier_io *io = kvt_list_first(&n->pending, struct tier_io, qlink);
		kvt_list_del(&io->qlink);
		n->bg_inflight++;
		io->bg = true;
		start_io(n, io);
	}
}

/* A page a client waits for: ahead of the prefetches and the write-back. */
static void nvme_hurry(struct tier *t, struct tier_io *io)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	if (io->tier != t || io->urgent)
		return;
	io->urgent = true;
	if (!kvt_list_linked(&io->qlink))
		return; /* under way already */
	kvt_list_del(&io->qlink);
	kvt_list_add_tail(&n->urgent, &io->qlink);
	start_pending(n);
}

static void io_complete(struct kvt_op *op, int res, uint32_t flags)
{
	(void)flags;
	struct tier_io *io = kvt_container_of(op, struct tier_io, op);
	struct nvme_tier *n = (struct nvme_tier *)io->tier;
	n->inflight--;
	n->bg_inflight -= io->bg;
	io->bg = false;
	/* the header buffer, if any, is read below before anything can start again */
	const char *hdr = NULL;
	if (io->hb != HB_NONE) {
		hdr = n->hbufs + (size_t)io->hb * n->hdr_size;
		n->hfree[n->nhfree++] = io->hb;
		io->hb = HB_NONE;
	}
	/*
	 * What this completion leads to costs microseconds that the disk would sit out: a
	 * read's check and a next write's stamp are XXH3 over a page. What the completions
	 * before this one queued goes to the disk first (32 KiB reads at QD32 on the
	 * development machine's disk: 0.80-0.85 of fio's rate without, 0.93 with).
	 */
	if (io_uring_sq_ready(&n->base.p.loop->ring))
		kvt_loop_submit(n->base.p.loop);
	io->check = PAGE_OK;
	if (res < 0) {
		n->err[TIER_ERR_IO]++;
		io->res = res;
	} else if ((uint32_t)res != io->xfer) {
		n->err[TIER_ERR_SHORT]++;
		io->res = -EIO;
	} else if (io->dir == TIER_WRITE) {
		n->writes++;
		n->write_bytes += io->len;
		io->res = 0;
	} else {
		if (io->rd == RD_PAYLOAD) {
			io->check = page_verify_payload(io->buf, (uint16_t)n->hdr_size, io->slot,
							&io->meta);
			if (io->check != PAGE_OK) {
				/* again, header and all: the header tells a flipped bit from a
				 * stale page or an empty slot */
				io->rd = RD_AGAIN;
				kvt_list_add(io->urgent ? &n->urgent : &n->pending, &io->qlink);
				start_pending(n);
				return;
			}
		} else {
			io->check = page_verify(hdr, (uint16_t)n->hdr_size, io->buf,
						n->base.p.page_bytes, io->slot, &io->meta, NULL);
			if (io->check == PAGE_OK && io->rd == RD_AGAIN)
				kvt_warn("nvme", "slot %llu: its payload failed the remembered checksum, "
						 "the whole page passed its header's (the disk changed "
						 "between two reads?)",
					 (unsigned long long)TIER_SLOT_INDEX(io->slot));
		}
		switch (io->check) {
		case PAGE_OK:
			n->reads++;
			n->read_bytes += io->len;
			io->res = 0;
			break;
		case PAGE_STALE:
			n->err[TIER_ERR_STALE]++;
			io->res = -ESTALE;
			break;
		case PAGE_EMPTY:
			n->err[TIER_ERR_EMPTY]++;
			io->res = -ENODATA;
			break;
		default:
			n->err[TIER_ERR_CORRUPT]++;
			io->res = -EBADMSG;
			break;
		}
		if (io->res)
			kvt_warn("nvme", "slot %llu: %s (tenant %u seq %llu layer %u head %u page %u)",
				 (unsigned long long)TIER_SLOT_INDEX(io->slot),
				 page_check_str(io->check), io->meta.key.tenant,
				 (unsigned long long)io->meta.key.seq, io->meta.key.layer,
				 io->meta.key.kv_head, io->meta.key.index);
	}
	start_pending(n);
	io->done(io);
}

static int nvme_submit(struct tier *t, struct tier_io **ios, unsigned n_ios)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	for (unsigned i = 0; i < n_ios; i++) {
		struct tier_io *io = ios[i];
		uint64_t idx = TIER_SLOT_INDEX(io->slot);
		if (TIER_SLOT_ARENA(io->slot) || idx >= n->nslots || io->len > t->p.page_bytes ||
		    (io->dir == TIER_WRITE && io->meta.len != io->len) ||
		    ((uintptr_t)io->buf % 512))
			return -EINVAL;
	}
	for (unsigned i = 0; i < n_ios; i++) {
		ios[i]->tier = t;
		ios[i]->rd = RD_SLOT;
		kvt_list_init(&ios[i]->qlink);
		kvt_list_add_tail(ios[i]->urgent ? &n->urgent : &n->pending, &ios[i]->qlink);
	}
	/* Queued, not entered: the loop submits them all with its next run, in one call. */
	start_pending(n);
	return 0;
}

static void nvme_usage(struct tier *t, struct tier_usage *u)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	memset(u, 0, sizeof(*u));
	u->slots = n->pool.nslots;
	u->used = slot_pool_used(&n->pool);
	u->poisoned = n->pool.npoisoned;
	u->inflight = n->inflight + n->wipes_inflight + (uint64_t)!kvt_list_empty(&n->pending) +
		      (uint64_t)!kvt_list_empty(&n->urgent);
	u->capacity_bytes = u->slots * t->p.page_bytes;
	u->used_bytes = u->used * t->p.page_bytes;
	u->reads = n->reads;
	u->writes = n->writes;
	u->read_bytes = n->read_bytes;
	u->write_bytes = n->write_bytes;
	for (int i = 0; i < TIER_ERR_MAX; i++) {
		u->err[i] = n->err[i];
		u->errors += n->err[i];
	}
}

static uint32_t nvme_hdr_size(struct tier *t)
{
	return ((struct nvme_tier *)t)->hdr_size;
}

static uint32_t nvme_io_span(struct tier *t)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	return io_bytes(n, t->p.page_bytes) - n->hdr_size;
}

static uint32_t nvme_io_align(struct tier *t)
{
	return ((struct nvme_tier *)t)->walign;
}

struct scan_io {
	struct kvt_op op;
	struct scan *sc;
	char *buf;
	uint64_t idx;
	bool busy;
};

struct scan {
	struct nvme_tier *n;
	tier_scan_fn fn;
	void *arg;
	uint64_t next;
	unsigned busy;
	int64_t kept;
	uint64_t wiped;
	int err;
};

static void scan_next(struct scan_io *si);

static void scan_done(struct kvt_op *op, int res, uint32_t flags)
{
	(void)flags;
	struct scan_io *si = kvt_container_of(op, struct scan_io, op);
	struct scan *sc = si->sc;
	struct nvme_tier *n = sc->n;
	sc->busy--;
	si->busy = false;
	tier_slot_t slot = TIER_SLOT(0, si->idx);
	struct page_meta m = {0};
	enum page_check c;
	if (res < 0) {
		n->err[TIER_ERR_IO]++;
		sc->err = res;
		c = PAGE_CORRUPT;
	} else if ((uint32_t)res != n->slot_size) {
		n->err[TIER_ERR_SHORT]++;
		c = PAGE_CORRUPT;
	} else {
		c = page_verify(si->buf, (uint16_t)n->hdr_size, si->buf + n->hdr_size,
				n->base.p.page_bytes, slot, NULL, &m);
	}
	if (c != PAGE_EMPTY) {
		bool keep = c == PAGE_OK && sc->fn(sc->arg, slot, &m, c);
		if (c != PAGE_OK)
			sc->fn(sc->arg, slot, &m, c);
		slot_pool_claim(&n->pool, (uint32_t)si->idx);
		if (keep) {
			sc->kept++;
		} else {
			/* Torn, corrupt or unwanted: wipe it so it is never found again. */
			nvme_free(&n->base, slot);
			sc->wiped++;
		}
	}
	scan_next(si);
}

static void scan_next(struct scan_io *si)
{
	struct scan *sc = si->sc;
	struct nvme_tier *n = sc->n;
	if (sc->next >= n->nslots)
		return;
	si->idx = sc->next++;
	si->busy = true;
	sc->busy++;
	si->op.fn = scan_done;
	struct io_uring_sqe *sqe = kvt_loop_sqe(n->base.p.loop, &si->op);
	prep_rw(n, sqe, false, si->buf, n->slot_size, slot_off(n, si->idx), -1);
}

static int64_t nvme_scan(struct tier *t, tier_scan_fn fn, void *arg)
{
	struct nvme_tier *n = (struct nvme_tier *)t;
	if (n->formatted_now)
		return 0;
	unsigned depth = n->qd < 256 ? n->qd : 256;
	struct scan sc = {.n = n, .fn = fn, .arg = arg};
	struct scan_io *sios = kvt_calloc(depth, sizeof(*sios));
	char *bufs = NULL;
	if (!sios || posix_memalign((void **)&bufs, 4096, (size_t)depth * n->slot_size)) {
		kvt_free(sios);
		return -ENOMEM;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (unsigned i = 0; i < depth; i++) {
		sios[i].sc = &sc;
		sios[i].buf = bufs + (size_t)i * n->slot_size;
		scan_next(&sios[i]);
	}
	while (sc.busy)
		kvt_loop_run(t->p.loop, 1, 1000);
	nvme_drain(n);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	free(bufs);
	kvt_free(sios);
	double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
	kvt_notice("nvme", "scanned %llu slots in %.2f s: %lld pages kept, %llu wiped",
		   (unsigned long long)n->nslots, s, (long long)sc.kept,
		   (unsigned long long)sc.wiped);
	return sc.kept;
}

const struct tier_ops tier_nvme_ops = {
	.name = "nvme",
	.version = TIER_OPS_VERSION,
	.caps = TIER_CAP_PERSISTENT | TIER_CAP_SPAN,
	.open = nvme_open,
	.close = nvme_close,
	.arena_add = NULL,
	.alloc = nvme_alloc,
	.free = nvme_free,
	.poison = nvme_poison,
	.slot_ptr = nvme_slot_ptr,
	.submit = nvme_submit,
	.hurry = nvme_hurry,
	.usage = nvme_usage,
	.hdr_size = nvme_hdr_size,
	.io_align = nvme_io_align,
	.io_span = nvme_io_span,
	.scan = nvme_scan,
};
