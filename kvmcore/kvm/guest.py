"""The guest program: x86-64 machine code, page tables and GDT, built from bytes here.

The guest runs in 64-bit long mode with an identity map of large pages (1 GiB pages
when the vCPU's CPUID offers ``pdpe1gb``, else 2 MiB pages), so a guest store to
GPA ``x`` is a store to guest-virtual ``x``.  Everything it needs lives in one
private, never-logged memslot at :data:`PRIVATE_BASE` (64 GiB), so user memslots
anywhere below 64 GiB are reachable and their dirty logs see only the user's stores.

It runs at CPL 3 (user mode, no guest kernel, no IDT).  That keeps it an ordinary
program for every x86 KVM flavour: with VMX/SVM it runs natively either way, and on
hosts whose KVM shadows a CPL 0 guest by emulating it instruction by instruction
(PVM, as on the machine this was written on) CPL 3 code runs natively, so every
first store to a write-protected page is a real page fault the MMU handles, as in
a real guest.  Completion is a store to :attr:`GuestLayout.doorbell_gpa`, the page
just past the private slot, covered by a second private memslot that is
``KVM_MEM_READONLY``: the store is a ``KVM_EXIT_MMIO`` the host recognises, and
the kernel itself refuses (``EEXIST``) user slots overlapping it.  (``out``/``hlt``
would need CPL 0; a CPL 3 ``out`` with IOPL 3 works on VMX/SVM but not on PVM.)

Private slot layout (offsets from ``PRIVATE_BASE``)::

    0x0000   code (this module's program)
    0x1000   GDT: null, user code (0x08|3, L=1), user data (0x10|3), TSS (0x18, 16 bytes)
    0x2000   TSS (only present because long mode wants a valid TR)
    0x3000   PML4
    0x4000   PDPT (1 GiB leaves, or pointers to the PDs below)
    0x5000   page directories (2 MiB leaves), one per GiB when pdpe1gb is absent
    2 MiB*(1+i)  vCPU window i: command block (4 KiB) then a 1 MiB data buffer

The program loops forever: read the command block, do the stores/loads in order,
record after each one the index of the next in ``progress``, ring the doorbell and
jump back to read the next command.  Because the progress word is in memory, the
host always knows how many stores completed even when ``KVM_RUN`` returns early
(``KVM_EXIT_MMIO`` for a GPA without a memslot, ``KVM_EXIT_DIRTY_RING_FULL``...).
"""

from __future__ import annotations

import struct

import attrs

PAGE_SIZE = 4096
GIB = 1 << 30
MIB = 1 << 20

PRIVATE_BASE = 64 * GIB
"""GPA of the private slot; user GPAs must stay below it."""

IDENTITY_MAP_2M_LIMIT = 128 * GIB
"""With 2 MiB pages the map covers [0, 128 GiB): user space and the private slot."""
IDENTITY_MAP_1G_LIMIT = 512 * GIB
"""With 1 GiB pages one PDPT covers [0, 512 GiB)."""

CODE_OFFSET = 0x0000
GDT_OFFSET = 0x1000
TSS_OFFSET = 0x2000
PML4_OFFSET = 0x3000
PDPT_OFFSET = 0x4000
PD_OFFSET = 0x5000
HEADER_SIZE = 2 * MIB

WINDOW_SIZE = 2 * MIB
CMD_SIZE = PAGE_SIZE
DATA_SIZE = 1 * MIB
"""Bytes of the per-vCPU buffer: 131072 GPAs per ``KVM_RUN`` for write_many."""

SEL_CODE, SEL_DATA, SEL_TSS = 0x08 | 3, 0x10 | 3, 0x18

# Commands (the ``op`` word of the command block)
OP_NONE = 0
OP_STORE_U64 = 1
"""for i in progress..count: *(u64 *)gpas[i] = value"""
OP_COPY_BYTES = 2
"""for i in progress..count: dst[i] = src[i], one byte at a time"""

# Command block: u64 words at these offsets
CMD_OP, CMD_COUNT, CMD_VALUE, CMD_SRC, CMD_DST, CMD_PROGRESS, CMD_DOORBELL = 0, 8, 16, 24, 32, 40, 48
CMD_FORMAT = "<7Q"

# Page-table entry bits
_P, _RW, _US, _A, _D, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
_TABLE = _P | _RW | _US | _A
_LEAF = _P | _RW | _US | _A | _D | _PS


@attrs.frozen
class GuestLayout:
    """Where things are in the private slot, for a given number of vCPU windows."""

    max_vcpus: int
    gbpages: bool

    @property
    def private_size(self) -> int:
        return HEADER_SIZE + self.max_vcpus * WINDOW_SIZE

    @property
    def map_limit(self) -> int:
        return IDENTITY_MAP_1G_LIMIT if self.gbpages else IDENTITY_MAP_2M_LIMIT

    @property
    def entry(self) -> int:
        return PRIVATE_BASE + CODE_OFFSET

    @property
    def doorbell_gpa(self) -> int:
        """First page after the private slot, in a read-only slot: a store there exits."""
        return PRIVATE_BASE + self.private_size

    def window_offset(self, index: int) -> int:
        """Offset in the private slot of vCPU window ``index`` (its command block)."""
        return HEADER_SIZE + index * WINDOW_SIZE

    def cmd_gpa(self, index: int) -> int:
        return PRIVATE_BASE + self.window_offset(index)

    def data_gpa(self, index: int) -> int:
        return self.cmd_gpa(index) + CMD_SIZE


class _Assembler:
    """Just enough of an assembler: raw bytes plus labels for rel8/rel32 jumps."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, int, str]] = []  # (position, width, label)

    def emit(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.code += chunk

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def jump(self, opcode: bytes, name: str, width: int) -> None:
        """``opcode`` followed by a ``width``-byte displacement to label ``name``."""
        self.code += opcode
        self.fixups.append((len(self.code), width, name))
        self.code += bytes(width)

    def assemble(self) -> bytes:
        for pos, width, name in self.fixups:
            rel = self.labels[name] - (pos + width)
            fmt = "<b" if width == 1 else "<i"
            struct.pack_into(fmt, self.code, pos, rel)
        return bytes(self.code)


def program() -> bytes:
    """The guest's code.  ``rbx`` holds the GPA of this vCPU's command block.

    Encodings are x86-64 (REX.W = 0x48); registers: rax 0, rcx 1, rdx 2, rbx 3,
    rsi 6, rdi 7.
    """
    a = _Assembler()
    a.label("top")
    a.emit(b"\x48\x8b\x43" + bytes([CMD_OP]))  # mov rax, [rbx+op]
    a.emit(b"\x48\x83\xf8" + bytes([OP_STORE_U64]))  # cmp rax, OP_STORE_U64
    a.jump(b"\x0f\x84", "store", 4)  # je store
    a.emit(b"\x48\x83\xf8" + bytes([OP_COPY_BYTES]))  # cmp rax, OP_COPY_BYTES
    a.jump(b"\x0f\x84", "copy", 4)  # je copy
    a.label("done")
    a.emit(b"\x48\x8b\x53" + bytes([CMD_DOORBELL]))  # mov rdx, [rbx+doorbell]
    a.emit(b"\x88\x02")  # mov [rdx], al  -> KVM_EXIT_MMIO at the doorbell: complete
    a.jump(b"\xe9", "top", 4)  # jmp top (next KVM_RUN starts the next command)

    a.label("store")
    a.emit(b"\x48\x8b\x4b" + bytes([CMD_PROGRESS]))  # mov rcx, [rbx+progress]
    a.emit(b"\x48\x8b\x53" + bytes([CMD_COUNT]))  # mov rdx, [rbx+count]
    a.emit(b"\x48\x8b\x73" + bytes([CMD_SRC]))  # mov rsi, [rbx+src]   (array of GPAs)
    a.emit(b"\x48\x8b\x43" + bytes([CMD_VALUE]))  # mov rax, [rbx+value]
    a.label("store_loop")
    a.emit(b"\x48\x39\xd1")  # cmp rcx, rdx
    a.jump(b"\x0f\x83", "done", 4)  # jae done
    a.emit(b"\x48\x8b\x3c\xce")  # mov rdi, [rsi+rcx*8]
    a.emit(b"\x48\x89\x07")  # mov [rdi], rax        <- the store being logged
    a.emit(b"\x48\xff\xc1")  # inc rcx
    a.emit(b"\x48\x89\x4b" + bytes([CMD_PROGRESS]))  # mov [rbx+progress], rcx
    a.jump(b"\xeb", "store_loop", 1)  # jmp store_loop

    a.label("copy")
    a.emit(b"\x48\x8b\x4b" + bytes([CMD_PROGRESS]))  # mov rcx, [rbx+progress]
    a.emit(b"\x48\x8b\x53" + bytes([CMD_COUNT]))  # mov rdx, [rbx+count]
    a.emit(b"\x48\x8b\x73" + bytes([CMD_SRC]))  # mov rsi, [rbx+src]
    a.emit(b"\x48\x8b\x7b" + bytes([CMD_DST]))  # mov rdi, [rbx+dst]
    a.label("copy_loop")
    a.emit(b"\x48\x39\xd1")  # cmp rcx, rdx
    a.jump(b"\x0f\x83", "done", 4)  # jae done
    a.emit(b"\x8a\x04\x0e")  # mov al, [rsi+rcx]
    a.emit(b"\x88\x04\x0f")  # mov [rdi+rcx], al
    a.emit(b"\x48\xff\xc1")  # inc rcx
    a.emit(b"\x48\x89\x4b" + bytes([CMD_PROGRESS]))  # mov [rbx+progress], rcx
    a.jump(b"\xeb", "copy_loop", 1)  # jmp copy_loop
    return a.assemble()


def _segment_descriptor(access: int, flags: int) -> bytes:
    """An 8-byte code/data descriptor with base 0 and limit 0xfffff (4 GiB with G)."""
    limit = 0xFFFFF
    value = (
        (limit & 0xFFFF)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
    )
    return struct.pack("<Q", value)


def _tss_descriptor(base: int, limit: int) -> bytes:
    """A 16-byte 64-bit TSS descriptor, type 0xB (busy), present."""
    low = (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (0x8B << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56)
    )
    return struct.pack("<QQ", low, base >> 32)


TSS_LIMIT = 0x67


def gdt() -> bytes:
    """null, 64-bit ring-3 code (L=1), flat ring-3 data, TSS."""
    return (
        bytes(8)
        + _segment_descriptor(access=0xFB, flags=0xA)  # P, DPL 3, S, code exec/read accessed; G, L
        + _segment_descriptor(access=0xF3, flags=0xC)  # P, DPL 3, S, data read/write accessed; G, D/B
        + _tss_descriptor(PRIVATE_BASE + TSS_OFFSET, TSS_LIMIT)
    )


def page_tables(layout: GuestLayout) -> dict[int, bytes]:
    """Identity-map [0, map_limit) with large pages: {offset in private slot: bytes}."""
    tables: dict[int, bytes] = {}
    tables[PML4_OFFSET] = struct.pack("<Q", (PRIVATE_BASE + PDPT_OFFSET) | _TABLE)
    if layout.gbpages:
        tables[PDPT_OFFSET] = struct.pack("<512Q", *((i * GIB) | _LEAF for i in range(512)))
        return tables
    n_pd = layout.map_limit // GIB
    pdpt = [(PRIVATE_BASE + PD_OFFSET + i * PAGE_SIZE) | _TABLE for i in range(n_pd)]
    tables[PDPT_OFFSET] = struct.pack(f"<{n_pd}Q", *pdpt)
    for i in range(n_pd):
        base = i * GIB
        tables[PD_OFFSET + i * PAGE_SIZE] = struct.pack(
            "<512Q", *((base + j * 2 * MIB) | _LEAF for j in range(512))
        )
    assert PD_OFFSET + n_pd * PAGE_SIZE <= HEADER_SIZE
    return tables


def image(layout: GuestLayout) -> dict[int, bytes]:
    """Everything to copy into the private slot before the first ``KVM_RUN``."""
    parts = {CODE_OFFSET: program(), GDT_OFFSET: gdt(), TSS_OFFSET: bytes(TSS_LIMIT + 1)}
    parts.update(page_tables(layout))
    return parts


# Control-register and EFER bits for KVM_SET_SREGS
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED = 1 << 1

# CPUID leaf 0x80000001 EDX bit 26: 1 GiB pages
CPUID_EXT_FEATURES = 0x80000001
CPUID_EDX_PDPE1GB = 1 << 26
