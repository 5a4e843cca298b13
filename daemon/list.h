/* SPDX-License-Identifier: MIT */
#ifndef KVT_LIST_H
#define KVT_LIST_H

#include <stdbool.h>
#include <stddef.h>

/* Intrusive circular doubly-linked list (the Linux kernel's list_head). */
struct kvt_list {
	struct kvt_list *next, *prev;
};

#define kvt_container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

static inline void kvt_list_init(struct kvt_list *l)
{
	l->next = l->prev = l;
}

static inline bool kvt_list_empty(const struct kvt_list *l)
{
	return l->next == l;
}

/* Unlinked nodes point at themselves, so kvt_list_del is idempotent. */
static inline bool kvt_list_linked(const struct kvt_list *n)
{
	return n->next != n && n->next != NULL;
}

static inline void kvt_list_add(struct kvt_list *head, struct kvt_list *n)
{
	n->next = head->next;
	n->prev = head;
	head->next->prev = n;
	head->next = n;
}

static inline void kvt_list_add_tail(struct kvt_list *head, struct kvt_list *n)
{
	n->prev = head->prev;
	n->next = head;
	head->prev->next = n;
	head->prev = n;
}

static inline void kvt_list_del(struct kvt_list *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->next = n->prev = n;
}

#define kvt_list_first(head, type, member)                                                     \
	(kvt_list_empty(head) ? NULL : kvt_container_of((head)->next, type, member))
#define kvt_list_last(head, type, member)                                                      \
	(kvt_list_empty(head) ? NULL : kvt_container_of((head)->prev, type, member))

#define kvt_list_for_each_safe(pos, tmp, head)                                                 \
	for (pos = (head)->next, tmp = pos->next; pos != (head); pos = tmp, tmp = pos->next)

#define kvt_list_for_each_entry(pos, head, member)                                             \
	for (pos = kvt_container_of((head)->next, __typeof__(*pos), member); &pos->member != (head); \
	     pos = kvt_container_of(pos->member.next, __typeof__(*pos), member))

#define kvt_list_for_each_entry_safe(pos, tmp, head, member)                                   \
	for (pos = kvt_container_of((head)->next, __typeof__(*pos), member),                    \
	    tmp = kvt_container_of(pos->member.next, __typeof__(*pos), member);                 \
	     &pos->member != (head);                                                            \
	     pos = tmp, tmp = kvt_container_of(pos->member.next, __typeof__(*pos), member))

#endif
