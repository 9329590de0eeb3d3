/* stream.c - batched expert reads: io_uring (raw syscalls) or a pread thread pool, O_DIRECT
 * where the filesystem allows it, per-request status and CRC32C check.
 *
 * One fic_reader serves one file and runs one batch at a time (the io_uring ring and the pread
 * pool have a single owner). A batch runs either on the caller (fic_reader_read: no thread hop)
 * or on the reader's own I/O thread (fic_reader_submit, collected by fic_reader_wait), so that a
 * submitted batch progresses while the caller computes, without the caller calling back in.
 * fic_reader_read calls from several threads take turns; use several readers for parallel
 * callers. Nothing here prints, exits or keeps global state.
 */
#define _GNU_SOURCE
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "fic.h"

#if defined(__linux__) && defined(__has_include) && !defined(FIC_NO_URING)
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
/* IORING_FEAT_RW_CUR_POS arrived with IORING_OP_READ and IORING_REGISTER_PROBE (Linux 5.6). */
#if defined(IORING_FEAT_RW_CUR_POS) && defined(__NR_io_uring_setup) && \
    defined(__NR_io_uring_enter) && defined(__NR_io_uring_register)
#define FIC_HAVE_URING 1
#endif
#endif
#endif
#ifndef FIC_HAVE_URING
#define FIC_HAVE_URING 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#include <wmmintrin.h>
#define FIC_CRC_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define FIC_CRC_ARM 1
#endif

#define DIRECT_ALIGN 4096
#define FADV_WINDOW ((int64_t)2 << 20)
#define MAX_QUEUE_DEPTH 4096
#define MAX_THREADS 64
/* io_uring's sqe->len is 32 bits: bigger requests go in aligned pieces, like short reads. */
#define MAX_CHUNK ((int64_t)1 << 30)
/* EAGAIN / EINTR on one request, in a row without a byte of progress, before it fails with that
 * errno (a short read makes progress, so the remainder is always read again). */
#define MAX_RETRIES 32

static_assert(FIC_FAULT_KINDS == 5, "fic_faults.rules has one rule per kind");
static_assert(sizeof(fic_fault_rule) == 32, "fic_fault_rule layout (cffi and Python fill it)");
static_assert(sizeof(fic_faults) == 5 * 32 + 16, "fic_faults layout (cffi and Python fill it)");
static_assert(sizeof(fic_read_req) == 48, "fic_read_req layout");

/* ---- CRC32C ------------------------------------------------------------------------------ */

/* Reflected Castagnoli polynomial 0x82F63B78, slicing-by-8 (generated; table[0] is the classic
 * byte table, table[k][i] = table[k-1][i] >> 8 ^ table[0][table[k-1][i] & 0xff]). */
static const uint32_t crc32c_table[8][256] = {
    {
        0x00000000u, 0xF26B8303u, 0xE13B70F7u, 0x1350F3F4u, 0xC79A971Fu, 0x35F1141Cu,
        0x26A1E7E8u, 0xD4CA64EBu, 0x8AD958CFu, 0x78B2DBCCu, 0x6BE22838u, 0x9989AB3Bu,
        0x4D43CFD0u, 0xBF284CD3u, 0xAC78BF27u, 0x5E133C24u, 0x105EC76Fu, 0xE235446Cu,
        0xF165B798u, 0x030E349Bu, 0xD7C45070u, 0x25AFD373u, 0x36FF2087u, 0xC494A384u,
        0x9A879FA0u, 0x68EC1CA3u, 0x7BBCEF57u, 0x89D76C54u, 0x5D1D08BFu, 0xAF768BBCu,
        0xBC267848u, 0x4E4DFB4Bu, 0x20BD8EDEu, 0xD2D60DDDu, 0xC186FE29u, 0x33ED7D2Au,
        0xE72719C1u, 0x154C9AC2u, 0x061C6936u, 0xF477EA35u, 0xAA64D611u, 0x580F5512u,
        0x4B5FA6E6u, 0xB93425E5u, 0x6DFE410Eu, 0x9F95C20Du, 0x8CC531F9u, 0x7EAEB2FAu,
        0x30E349B1u, 0xC288CAB2u, 0xD1D83946u, 0x23B3BA45u, 0xF779DEAEu, 0x05125DADu,
        0x1642AE59u, 0xE4292D5Au, 0xBA3A117Eu, 0x4851927Du, 0x5B016189u, 0xA96AE28Au,
        0x7DA08661u, 0x8FCB0562u, 0x9C9BF696u, 0x6EF07595u, 0x417B1DBCu, 0xB3109EBFu,
        0xA0406D4Bu, 0x522BEE48u, 0x86E18AA3u, 0x748A09A0u, 0x67DAFA54u, 0x95B17957u,
        0xCBA24573u, 0x39C9C670u, 0x2A993584u, 0xD8F2B687u, 0x0C38D26Cu, 0xFE53516Fu,
        0xED03A29Bu, 0x1F682198u, 0x5125DAD3u, 0xA34E59D0u, 0xB01EAA24u, 0x42752927u,
        0x96BF4DCCu, 0x64D4CECFu, 0x77843D3Bu, 0x85EFBE38u, 0xDBFC821Cu, 0x2997011Fu,
        0x3AC7F2EBu, 0xC8AC71E8u, 0x1C661503u, 0xEE0D9600u, 0xFD5D65F4u, 0x0F36E6F7u,
        0x61C69362u, 0x93AD1061u, 0x80FDE395u, 0x72966096u, 0xA65C047Du, 0x5437877Eu,
        0x4767748Au, 0xB50CF789u, 0xEB1FCBADu, 0x197448AEu, 0x0A24BB5Au, 0xF84F3859u,
        0x2C855CB2u, 0xDEEEDFB1u, 0xCDBE2C45u, 0x3FD5AF46u, 0x7198540Du, 0x83F3D70Eu,
        0x90A324FAu, 0x62C8A7F9u, 0xB602C312u, 0x44694011u, 0x5739B3E5u, 0xA55230E6u,
        0xFB410CC2u, 0x092A8FC1u, 0x1A7A7C35u, 0xE811FF36u, 0x3CDB9BDDu, 0xCEB018DEu,
        0xDDE0EB2Au, 0x2F8B6829u, 0x82F63B78u, 0x709DB87Bu, 0x63CD4B8Fu, 0x91A6C88Cu,
        0x456CAC67u, 0xB7072F64u, 0xA457DC90u, 0x563C5F93u, 0x082F63B7u, 0xFA44E0B4u,
        0xE9141340u, 0x1B7F9043u, 0xCFB5F4A8u, 0x3DDE77ABu, 0x2E8E845Fu, 0xDCE5075Cu,
        0x92A8FC17u, 0x60C37F14u, 0x73938CE0u, 0x81F80FE3u, 0x55326B08u, 0xA759E80Bu,
        0xB4091BFFu, 0x466298FCu, 0x1871A4D8u, 0xEA1A27DBu, 0xF94AD42Fu, 0x0B21572Cu,
        0xDFEB33C7u, 0x2D80B0C4u, 0x3ED04330u, 0xCCBBC033u, 0xA24BB5A6u, 0x502036A5u,
        0x4370C551u, 0xB11B4652u, 0x65D122B9u, 0x97BAA1BAu, 0x84EA524Eu, 0x7681D14Du,
        0x2892ED69u, 0xDAF96E6Au, 0xC9A99D9Eu, 0x3BC21E9Du, 0xEF087A76u, 0x1D63F975u,
        0x0E330A81u, 0xFC588982u, 0xB21572C9u, 0x407EF1CAu, 0x532E023Eu, 0xA145813Du,
        0x758FE5D6u, 0x87E466D5u, 0x94B49521u, 0x66DF1622u, 0x38CC2A06u, 0xCAA7A905u,
        0xD9F75AF1u, 0x2B9CD9F2u, 0xFF56BD19u, 0x0D3D3E1Au, 0x1E6DCDEEu, 0xEC064EEDu,
        0xC38D26C4u, 0x31E6A5C7u, 0x22B65633u, 0xD0DDD530u, 0x0417B1DBu, 0xF67C32D8u,
        0xE52CC12Cu, 0x1747422Fu, 0x49547E0Bu, 0xBB3FFD08u, 0xA86F0EFCu, 0x5A048DFFu,
        0x8ECEE914u, 0x7CA56A17u, 0x6FF599E3u, 0x9D9E1AE0u, 0xD3D3E1ABu, 0x21B862A8u,
        0x32E8915Cu, 0xC083125Fu, 0x144976B4u, 0xE622F5B7u, 0xF5720643u, 0x07198540u,
        0x590AB964u, 0xAB613A67u, 0xB831C993u, 0x4A5A4A90u, 0x9E902E7Bu, 0x6CFBAD78u,
        0x7FAB5E8Cu, 0x8DC0DD8Fu, 0xE330A81Au, 0x115B2B19u, 0x020BD8EDu, 0xF0605BEEu,
        0x24AA3F05u, 0xD6C1BC06u, 0xC5914FF2u, 0x37FACCF1u, 0x69E9F0D5u, 0x9B8273D6u,
        0x88D28022u, 0x7AB90321u, 0xAE7367CAu, 0x5C18E4C9u, 0x4F48173Du, 0xBD23943Eu,
        0xF36E6F75u, 0x0105EC76u, 0x12551F82u, 0xE03E9C81u, 0x34F4F86Au, 0xC69F7B69u,
        0xD5CF889Du, 0x27A40B9Eu, 0x79B737BAu, 0x8BDCB4B9u, 0x988C474Du, 0x6AE7C44Eu,
        0xBE2DA0A5u, 0x4C4623A6u, 0x5F16D052u, 0xAD7D5351u,
    },
    {
        0x00000000u, 0x13A29877u, 0x274530EEu, 0x34E7A899u, 0x4E8A61DCu, 0x5D28F9ABu,
        0x69CF5132u, 0x7A6DC945u, 0x9D14C3B8u, 0x8EB65BCFu, 0xBA51F356u, 0xA9F36B21u,
        0xD39EA264u, 0xC03C3A13u, 0xF4DB928Au, 0xE7790AFDu, 0x3FC5F181u, 0x2C6769F6u,
        0x1880C16Fu, 0x0B225918u, 0x714F905Du, 0x62ED082Au, 0x560AA0B3u, 0x45A838C4u,
        0xA2D13239u, 0xB173AA4Eu, 0x859402D7u, 0x96369AA0u, 0xEC5B53E5u, 0xFFF9CB92u,
        0xCB1E630Bu, 0xD8BCFB7Cu, 0x7F8BE302u, 0x6C297B75u, 0x58CED3ECu, 0x4B6C4B9Bu,
        0x310182DEu, 0x22A31AA9u, 0x1644B230u, 0x05E62A47u, 0xE29F20BAu, 0xF13DB8CDu,
        0xC5DA1054u, 0xD6788823u, 0xAC154166u, 0xBFB7D911u, 0x8B507188u, 0x98F2E9FFu,
        0x404E1283u, 0x53EC8AF4u, 0x670B226Du, 0x74A9BA1Au, 0x0EC4735Fu, 0x1D66EB28u,
        0x298143B1u, 0x3A23DBC6u, 0xDD5AD13Bu, 0xCEF8494Cu, 0xFA1FE1D5u, 0xE9BD79A2u,
        0x93D0B0E7u, 0x80722890u, 0xB4958009u, 0xA737187Eu, 0xFF17C604u, 0xECB55E73u,
        0xD852F6EAu, 0xCBF06E9Du, 0xB19DA7D8u, 0xA23F3FAFu, 0x96D89736u, 0x857A0F41u,
        0x620305BCu, 0x71A19DCBu, 0x45463552u, 0x56E4AD25u, 0x2C896460u, 0x3F2BFC17u,
        0x0BCC548Eu, 0x186ECCF9u, 0xC0D23785u, 0xD370AFF2u, 0xE797076Bu, 0xF4359F1Cu,
        0x8E585659u, 0x9DFACE2Eu, 0xA91D66B7u, 0xBABFFEC0u, 0x5DC6F43Du, 0x4E646C4Au,
        0x7A83C4D3u, 0x69215CA4u, 0x134C95E1u, 0x00EE0D96u, 0x3409A50Fu, 0x27AB3D78u,
        0x809C2506u, 0x933EBD71u, 0xA7D915E8u, 0xB47B8D9Fu, 0xCE1644DAu, 0xDDB4DCADu,
        0xE9537434u, 0xFAF1EC43u, 0x1D88E6BEu, 0x0E2A7EC9u, 0x3ACDD650u, 0x296F4E27u,
        0x53028762u, 0x40A01F15u, 0x7447B78Cu, 0x67E52FFBu, 0xBF59D487u, 0xACFB4CF0u,
        0x981CE469u, 0x8BBE7C1Eu, 0xF1D3B55Bu, 0xE2712D2Cu, 0xD69685B5u, 0xC5341DC2u,
        0x224D173Fu, 0x31EF8F48u, 0x050827D1u, 0x16AABFA6u, 0x6CC776E3u, 0x7F65EE94u,
        0x4B82460Du, 0x5820DE7Au, 0xFBC3FAF9u, 0xE861628Eu, 0xDC86CA17u, 0xCF245260u,
        0xB5499B25u, 0xA6EB0352u, 0x920CABCBu, 0x81AE33BCu, 0x66D73941u, 0x7575A136u,
        0x419209AFu, 0x523091D8u, 0x285D589Du, 0x3BFFC0EAu, 0x0F186873u, 0x1CBAF004u,
        0xC4060B78u, 0xD7A4930Fu, 0xE3433B96u, 0xF0E1A3E1u, 0x8A8C6AA4u, 0x992EF2D3u,
        0xADC95A4Au, 0xBE6BC23Du, 0x5912C8C0u, 0x4AB050B7u, 0x7E57F82Eu, 0x6DF56059u,
        0x1798A91Cu, 0x043A316Bu, 0x30DD99F2u, 0x237F0185u, 0x844819FBu, 0x97EA818Cu,
        0xA30D2915u, 0xB0AFB162u, 0xCAC27827u, 0xD960E050u, 0xED8748C9u, 0xFE25D0BEu,
        0x195CDA43u, 0x0AFE4234u, 0x3E19EAADu, 0x2DBB72DAu, 0x57D6BB9Fu, 0x447423E8u,
        0x70938B71u, 0x63311306u, 0xBB8DE87Au, 0xA82F700Du, 0x9CC8D894u, 0x8F6A40E3u,
        0xF50789A6u, 0xE6A511D1u, 0xD242B948u, 0xC1E0213Fu, 0x26992BC2u, 0x353BB3B5u,
        0x01DC1B2Cu, 0x127E835Bu, 0x68134A1Eu, 0x7BB1D269u, 0x4F567AF0u, 0x5CF4E287u,
        0x04D43CFDu, 0x1776A48Au, 0x23910C13u, 0x30339464u, 0x4A5E5D21u, 0x59FCC556u,
        0x6D1B6DCFu, 0x7EB9F5B8u, 0x99C0FF45u, 0x8A626732u, 0xBE85CFABu, 0xAD2757DCu,
        0xD74A9E99u, 0xC4E806EEu, 0xF00FAE77u, 0xE3AD3600u, 0x3B11CD7Cu, 0x28B3550Bu,
        0x1C54FD92u, 0x0FF665E5u, 0x759BACA0u, 0x663934D7u, 0x52DE9C4Eu, 0x417C0439u,
        0xA6050EC4u, 0xB5A796B3u, 0x81403E2Au, 0x92E2A65Du, 0xE88F6F18u, 0xFB2DF76Fu,
        0xCFCA5FF6u, 0xDC68C781u, 0x7B5FDFFFu, 0x68FD4788u, 0x5C1AEF11u, 0x4FB87766u,
        0x35D5BE23u, 0x26772654u, 0x12908ECDu, 0x013216BAu, 0xE64B1C47u, 0xF5E98430u,
        0xC10E2CA9u, 0xD2ACB4DEu, 0xA8C17D9Bu, 0xBB63E5ECu, 0x8F844D75u, 0x9C26D502u,
        0x449A2E7Eu, 0x5738B609u, 0x63DF1E90u, 0x707D86E7u, 0x0A104FA2u, 0x19B2D7D5u,
        0x2D557F4Cu, 0x3EF7E73Bu, 0xD98EEDC6u, 0xCA2C75B1u, 0xFECBDD28u, 0xED69455Fu,
        0x97048C1Au, 0x84A6146Du, 0xB041BCF4u, 0xA3E32483u,
    },
    {
        0x00000000u, 0xA541927Eu, 0x4F6F520Du, 0xEA2EC073u, 0x9EDEA41Au, 0x3B9F3664u,
        0xD1B1F617u, 0x74F06469u, 0x38513EC5u, 0x9D10ACBBu, 0x773E6CC8u, 0xD27FFEB6u,
        0xA68F9ADFu, 0x03CE08A1u, 0xE9E0C8D2u, 0x4CA15AACu, 0x70A27D8Au, 0xD5E3EFF4u,
        0x3FCD2F87u, 0x9A8CBDF9u, 0xEE7CD990u, 0x4B3D4BEEu, 0xA1138B9Du, 0x045219E3u,
        0x48F3434Fu, 0xEDB2D131u, 0x079C1142u, 0xA2DD833Cu, 0xD62DE755u, 0x736C752Bu,
        0x9942B558u, 0x3C032726u, 0xE144FB14u, 0x4405696Au, 0xAE2BA919u, 0x0B6A3B67u,
        0x7F9A5F0Eu, 0xDADBCD70u, 0x30F50D03u, 0x95B49F7Du, 0xD915C5D1u, 0x7C5457AFu,
        0x967A97DCu, 0x333B05A2u, 0x47CB61CBu, 0xE28AF3B5u, 0x08A433C6u, 0xADE5A1B8u,
        0x91E6869Eu, 0x34A714E0u, 0xDE89D493u, 0x7BC846EDu, 0x0F382284u, 0xAA79B0FAu,
        0x40577089u, 0xE516E2F7u, 0xA9B7B85Bu, 0x0CF62A25u, 0xE6D8EA56u, 0x43997828u,
        0x37691C41u, 0x92288E3Fu, 0x78064E4Cu, 0xDD47DC32u, 0xC76580D9u, 0x622412A7u,
        0x880AD2D4u, 0x2D4B40AAu, 0x59BB24C3u, 0xFCFAB6BDu, 0x16D476CEu, 0xB395E4B0u,
        0xFF34BE1Cu, 0x5A752C62u, 0xB05BEC11u, 0x151A7E6Fu, 0x61EA1A06u, 0xC4AB8878u,
        0x2E85480Bu, 0x8BC4DA75u, 0xB7C7FD53u, 0x12866F2Du, 0xF8A8AF5Eu, 0x5DE93D20u,
        0x29195949u, 0x8C58CB37u, 0x66760B44u, 0xC337993Au, 0x8F96C396u, 0x2AD751E8u,
        0xC0F9919Bu, 0x65B803E5u, 0x1148678Cu, 0xB409F5F2u, 0x5E273581u, 0xFB66A7FFu,
        0x26217BCDu, 0x8360E9B3u, 0x694E29C0u, 0xCC0FBBBEu, 0xB8FFDFD7u, 0x1DBE4DA9u,
        0xF7908DDAu, 0x52D11FA4u, 0x1E704508u, 0xBB31D776u, 0x511F1705u, 0xF45E857Bu,
        0x80AEE112u, 0x25EF736Cu, 0xCFC1B31Fu, 0x6A802161u, 0x56830647u, 0xF3C29439u,
        0x19EC544Au, 0xBCADC634u, 0xC85DA25Du, 0x6D1C3023u, 0x8732F050u, 0x2273622Eu,
        0x6ED23882u, 0xCB93AAFCu, 0x21BD6A8Fu, 0x84FCF8F1u, 0xF00C9C98u, 0x554D0EE6u,
        0xBF63CE95u, 0x1A225CEBu, 0x8B277743u, 0x2E66E53Du, 0xC448254Eu, 0x6109B730u,
        0x15F9D359u, 0xB0B84127u, 0x5A968154u, 0xFFD7132Au, 0xB3764986u, 0x1637DBF8u,
        0xFC191B8Bu, 0x595889F5u, 0x2DA8ED9Cu, 0x88E97FE2u, 0x62C7BF91u, 0xC7862DEFu,
        0xFB850AC9u, 0x5EC498B7u, 0xB4EA58C4u, 0x11ABCABAu, 0x655BAED3u, 0xC01A3CADu,
        0x2A34FCDEu, 0x8F756EA0u, 0xC3D4340Cu, 0x6695A672u, 0x8CBB6601u, 0x29FAF47Fu,
        0x5D0A9016u, 0xF84B0268u, 0x1265C21Bu, 0xB7245065u, 0x6A638C57u, 0xCF221E29u,
        0x250CDE5Au, 0x804D4C24u, 0xF4BD284Du, 0x51FCBA33u, 0xBBD27A40u, 0x1E93E83Eu,
        0x5232B292u, 0xF77320ECu, 0x1D5DE09Fu, 0xB81C72E1u, 0xCCEC1688u, 0x69AD84F6u,
        0x83834485u, 0x26C2D6FBu, 0x1AC1F1DDu, 0xBF8063A3u, 0x55AEA3D0u, 0xF0EF31AEu,
        0x841F55C7u, 0x215EC7B9u, 0xCB7007CAu, 0x6E3195B4u, 0x2290CF18u, 0x87D15D66u,
        0x6DFF9D15u, 0xC8BE0F6Bu, 0xBC4E6B02u, 0x190FF97Cu, 0xF321390Fu, 0x5660AB71u,
        0x4C42F79Au, 0xE90365E4u, 0x032DA597u, 0xA66C37E9u, 0xD29C5380u, 0x77DDC1FEu,
        0x9DF3018Du, 0x38B293F3u, 0x7413C95Fu, 0xD1525B21u, 0x3B7C9B52u, 0x9E3D092Cu,
        0xEACD6D45u, 0x4F8CFF3Bu, 0xA5A23F48u, 0x00E3AD36u, 0x3CE08A10u, 0x99A1186Eu,
        0x738FD81Du, 0xD6CE4A63u, 0xA23E2E0Au, 0x077FBC74u, 0xED517C07u, 0x4810EE79u,
        0x04B1B4D5u, 0xA1F026ABu, 0x4BDEE6D8u, 0xEE9F74A6u, 0x9A6F10CFu, 0x3F2E82B1u,
        0xD50042C2u, 0x7041D0BCu, 0xAD060C8Eu, 0x08479EF0u, 0xE2695E83u, 0x4728CCFDu,
        0x33D8A894u, 0x96993AEAu, 0x7CB7FA99u, 0xD9F668E7u, 0x9557324Bu, 0x3016A035u,
        0xDA386046u, 0x7F79F238u, 0x0B899651u, 0xAEC8042Fu, 0x44E6C45Cu, 0xE1A75622u,
        0xDDA47104u, 0x78E5E37Au, 0x92CB2309u, 0x378AB177u, 0x437AD51Eu, 0xE63B4760u,
        0x0C158713u, 0xA954156Du, 0xE5F54FC1u, 0x40B4DDBFu, 0xAA9A1DCCu, 0x0FDB8FB2u,
        0x7B2BEBDBu, 0xDE6A79A5u, 0x3444B9D6u, 0x91052BA8u,
    },
    {
        0x00000000u, 0xDD45AAB8u, 0xBF672381u, 0x62228939u, 0x7B2231F3u, 0xA6679B4Bu,
        0xC4451272u, 0x1900B8CAu, 0xF64463E6u, 0x2B01C95Eu, 0x49234067u, 0x9466EADFu,
        0x8D665215u, 0x5023F8ADu, 0x32017194u, 0xEF44DB2Cu, 0xE964B13Du, 0x34211B85u,
        0x560392BCu, 0x8B463804u, 0x924680CEu, 0x4F032A76u, 0x2D21A34Fu, 0xF06409F7u,
        0x1F20D2DBu, 0xC2657863u, 0xA047F15Au, 0x7D025BE2u, 0x6402E328u, 0xB9474990u,
        0xDB65C0A9u, 0x06206A11u, 0xD725148Bu, 0x0A60BE33u, 0x6842370Au, 0xB5079DB2u,
        0xAC072578u, 0x71428FC0u, 0x136006F9u, 0xCE25AC41u, 0x2161776Du, 0xFC24DDD5u,
        0x9E0654ECu, 0x4343FE54u, 0x5A43469Eu, 0x8706EC26u, 0xE524651Fu, 0x3861CFA7u,
        0x3E41A5B6u, 0xE3040F0Eu, 0x81268637u, 0x5C632C8Fu, 0x45639445u, 0x98263EFDu,
        0xFA04B7C4u, 0x27411D7Cu, 0xC805C650u, 0x15406CE8u, 0x7762E5D1u, 0xAA274F69u,
        0xB327F7A3u, 0x6E625D1Bu, 0x0C40D422u, 0xD1057E9Au, 0xABA65FE7u, 0x76E3F55Fu,
        0x14C17C66u, 0xC984D6DEu, 0xD0846E14u, 0x0DC1C4ACu, 0x6FE34D95u, 0xB2A6E72Du,
        0x5DE23C01u, 0x80A796B9u, 0xE2851F80u, 0x3FC0B538u, 0x26C00DF2u, 0xFB85A74Au,
        0x99A72E73u, 0x44E284CBu, 0x42C2EEDAu, 0x9F874462u, 0xFDA5CD5Bu, 0x20E067E3u,
        0x39E0DF29u, 0xE4A57591u, 0x8687FCA8u, 0x5BC25610u, 0xB4868D3Cu, 0x69C32784u,
        0x0BE1AEBDu, 0xD6A40405u, 0xCFA4BCCFu, 0x12E11677u, 0x70C39F4Eu, 0xAD8635F6u,
        0x7C834B6Cu, 0xA1C6E1D4u, 0xC3E468EDu, 0x1EA1C255u, 0x07A17A9Fu, 0xDAE4D027u,
        0xB8C6591Eu, 0x6583F3A6u, 0x8AC7288Au, 0x57828232u, 0x35A00B0Bu, 0xE8E5A1B3u,
        0xF1E51979u, 0x2CA0B3C1u, 0x4E823AF8u, 0x93C79040u, 0x95E7FA51u, 0x48A250E9u,
        0x2A80D9D0u, 0xF7C57368u, 0xEEC5CBA2u, 0x3380611Au, 0x51A2E823u, 0x8CE7429Bu,
        0x63A399B7u, 0xBEE6330Fu, 0xDCC4BA36u, 0x0181108Eu, 0x1881A844u, 0xC5C402FCu,
        0xA7E68BC5u, 0x7AA3217Du, 0x52A0C93Fu, 0x8FE56387u, 0xEDC7EABEu, 0x30824006u,
        0x2982F8CCu, 0xF4C75274u, 0x96E5DB4Du, 0x4BA071F5u, 0xA4E4AAD9u, 0x79A10061u,
        0x1B838958u, 0xC6C623E0u, 0xDFC69B2Au, 0x02833192u, 0x60A1B8ABu, 0xBDE41213u,
        0xBBC47802u, 0x6681D2BAu, 0x04A35B83u, 0xD9E6F13Bu, 0xC0E649F1u, 0x1DA3E349u,
        0x7F816A70u, 0xA2C4C0C8u, 0x4D801BE4u, 0x90C5B15Cu, 0xF2E73865u, 0x2FA292DDu,
        0x36A22A17u, 0xEBE780AFu, 0x89C50996u, 0x5480A32Eu, 0x8585DDB4u, 0x58C0770Cu,
        0x3AE2FE35u, 0xE7A7548Du, 0xFEA7EC47u, 0x23E246FFu, 0x41C0CFC6u, 0x9C85657Eu,
        0x73C1BE52u, 0xAE8414EAu, 0xCCA69DD3u, 0x11E3376Bu, 0x08E38FA1u, 0xD5A62519u,
        0xB784AC20u, 0x6AC10698u, 0x6CE16C89u, 0xB1A4C631u, 0xD3864F08u, 0x0EC3E5B0u,
        0x17C35D7Au, 0xCA86F7C2u, 0xA8A47EFBu, 0x75E1D443u, 0x9AA50F6Fu, 0x47E0A5D7u,
        0x25C22CEEu, 0xF8878656u, 0xE1873E9Cu, 0x3CC29424u, 0x5EE01D1Du, 0x83A5B7A5u,
        0xF90696D8u, 0x24433C60u, 0x4661B559u, 0x9B241FE1u, 0x8224A72Bu, 0x5F610D93u,
        0x3D4384AAu, 0xE0062E12u, 0x0F42F53Eu, 0xD2075F86u, 0xB025D6BFu, 0x6D607C07u,
        0x7460C4CDu, 0xA9256E75u, 0xCB07E74Cu, 0x16424DF4u, 0x106227E5u, 0xCD278D5Du,
        0xAF050464u, 0x7240AEDCu, 0x6B401616u, 0xB605BCAEu, 0xD4273597u, 0x09629F2Fu,
        0xE6264403u, 0x3B63EEBBu, 0x59416782u, 0x8404CD3Au, 0x9D0475F0u, 0x4041DF48u,
        0x22635671u, 0xFF26FCC9u, 0x2E238253u, 0xF36628EBu, 0x9144A1D2u, 0x4C010B6Au,
        0x5501B3A0u, 0x88441918u, 0xEA669021u, 0x37233A99u, 0xD867E1B5u, 0x05224B0Du,
        0x6700C234u, 0xBA45688Cu, 0xA345D046u, 0x7E007AFEu, 0x1C22F3C7u, 0xC167597Fu,
        0xC747336Eu, 0x1A0299D6u, 0x782010EFu, 0xA565BA57u, 0xBC65029Du, 0x6120A825u,
        0x0302211Cu, 0xDE478BA4u, 0x31035088u, 0xEC46FA30u, 0x8E647309u, 0x5321D9B1u,
        0x4A21617Bu, 0x9764CBC3u, 0xF54642FAu, 0x2803E842u,
    },
    {
        0x00000000u, 0x38116FACu, 0x7022DF58u, 0x4833B0F4u, 0xE045BEB0u, 0xD854D11Cu,
        0x906761E8u, 0xA8760E44u, 0xC5670B91u, 0xFD76643Du, 0xB545D4C9u, 0x8D54BB65u,
        0x2522B521u, 0x1D33DA8Du, 0x55006A79u, 0x6D1105D5u, 0x8F2261D3u, 0xB7330E7Fu,
        0xFF00BE8Bu, 0xC711D127u, 0x6F67DF63u, 0x5776B0CFu, 0x1F45003Bu, 0x27546F97u,
        0x4A456A42u, 0x725405EEu, 0x3A67B51Au, 0x0276DAB6u, 0xAA00D4F2u, 0x9211BB5Eu,
        0xDA220BAAu, 0xE2336406u, 0x1BA8B557u, 0x23B9DAFBu, 0x6B8A6A0Fu, 0x539B05A3u,
        0xFBED0BE7u, 0xC3FC644Bu, 0x8BCFD4BFu, 0xB3DEBB13u, 0xDECFBEC6u, 0xE6DED16Au,
        0xAEED619Eu, 0x96FC0E32u, 0x3E8A0076u, 0x069B6FDAu, 0x4EA8DF2Eu, 0x76B9B082u,
        0x948AD484u, 0xAC9BBB28u, 0xE4A80BDCu, 0xDCB96470u, 0x74CF6A34u, 0x4CDE0598u,
        0x04EDB56Cu, 0x3CFCDAC0u, 0x51EDDF15u, 0x69FCB0B9u, 0x21CF004Du, 0x19DE6FE1u,
        0xB1A861A5u, 0x89B90E09u, 0xC18ABEFDu, 0xF99BD151u, 0x37516AAEu, 0x0F400502u,
        0x4773B5F6u, 0x7F62DA5Au, 0xD714D41Eu, 0xEF05BBB2u, 0xA7360B46u, 0x9F2764EAu,
        0xF236613Fu, 0xCA270E93u, 0x8214BE67u, 0xBA05D1CBu, 0x1273DF8Fu, 0x2A62B023u,
        0x625100D7u, 0x5A406F7Bu, 0xB8730B7Du, 0x806264D1u, 0xC851D425u, 0xF040BB89u,
        0x5836B5CDu, 0x6027DA61u, 0x28146A95u, 0x10050539u, 0x7D1400ECu, 0x45056F40u,
        0x0D36DFB4u, 0x3527B018u, 0x9D51BE5Cu, 0xA540D1F0u, 0xED736104u, 0xD5620EA8u,
        0x2CF9DFF9u, 0x14E8B055u, 0x5CDB00A1u, 0x64CA6F0Du, 0xCCBC6149u, 0xF4AD0EE5u,
        0xBC9EBE11u, 0x848FD1BDu, 0xE99ED468u, 0xD18FBBC4u, 0x99BC0B30u, 0xA1AD649Cu,
        0x09DB6AD8u, 0x31CA0574u, 0x79F9B580u, 0x41E8DA2Cu, 0xA3DBBE2Au, 0x9BCAD186u,
        0xD3F96172u, 0xEBE80EDEu, 0x439E009Au, 0x7B8F6F36u, 0x33BCDFC2u, 0x0BADB06Eu,
        0x66BCB5BBu, 0x5EADDA17u, 0x169E6AE3u, 0x2E8F054Fu, 0x86F90B0Bu, 0xBEE864A7u,
        0xF6DBD453u, 0xCECABBFFu, 0x6EA2D55Cu, 0x56B3BAF0u, 0x1E800A04u, 0x269165A8u,
        0x8EE76BECu, 0xB6F60440u, 0xFEC5B4B4u, 0xC6D4DB18u, 0xABC5DECDu, 0x93D4B161u,
        0xDBE70195u, 0xE3F66E39u, 0x4B80607Du, 0x73910FD1u, 0x3BA2BF25u, 0x03B3D089u,
        0xE180B48Fu, 0xD991DB23u, 0x91A26BD7u, 0xA9B3047Bu, 0x01C50A3Fu, 0x39D46593u,
        0x71E7D567u, 0x49F6BACBu, 0x24E7BF1Eu, 0x1CF6D0B2u, 0x54C56046u, 0x6CD40FEAu,
        0xC4A201AEu, 0xFCB36E02u, 0xB480DEF6u, 0x8C91B15Au, 0x750A600Bu, 0x4D1B0FA7u,
        0x0528BF53u, 0x3D39D0FFu, 0x954FDEBBu, 0xAD5EB117u, 0xE56D01E3u, 0xDD7C6E4Fu,
        0xB06D6B9Au, 0x887C0436u, 0xC04FB4C2u, 0xF85EDB6Eu, 0x5028D52Au, 0x6839BA86u,
        0x200A0A72u, 0x181B65DEu, 0xFA2801D8u, 0xC2396E74u, 0x8A0ADE80u, 0xB21BB12Cu,
        0x1A6DBF68u, 0x227CD0C4u, 0x6A4F6030u, 0x525E0F9Cu, 0x3F4F0A49u, 0x075E65E5u,
        0x4F6DD511u, 0x777CBABDu, 0xDF0AB4F9u, 0xE71BDB55u, 0xAF286BA1u, 0x9739040Du,
        0x59F3BFF2u, 0x61E2D05Eu, 0x29D160AAu, 0x11C00F06u, 0xB9B60142u, 0x81A76EEEu,
        0xC994DE1Au, 0xF185B1B6u, 0x9C94B463u, 0xA485DBCFu, 0xECB66B3Bu, 0xD4A70497u,
        0x7CD10AD3u, 0x44C0657Fu, 0x0CF3D58Bu, 0x34E2BA27u, 0xD6D1DE21u, 0xEEC0B18Du,
        0xA6F30179u, 0x9EE26ED5u, 0x36946091u, 0x0E850F3Du, 0x46B6BFC9u, 0x7EA7D065u,
        0x13B6D5B0u, 0x2BA7BA1Cu, 0x63940AE8u, 0x5B856544u, 0xF3F36B00u, 0xCBE204ACu,
        0x83D1B458u, 0xBBC0DBF4u, 0x425B0AA5u, 0x7A4A6509u, 0x3279D5FDu, 0x0A68BA51u,
        0xA21EB415u, 0x9A0FDBB9u, 0xD23C6B4Du, 0xEA2D04E1u, 0x873C0134u, 0xBF2D6E98u,
        0xF71EDE6Cu, 0xCF0FB1C0u, 0x6779BF84u, 0x5F68D028u, 0x175B60DCu, 0x2F4A0F70u,
        0xCD796B76u, 0xF56804DAu, 0xBD5BB42Eu, 0x854ADB82u, 0x2D3CD5C6u, 0x152DBA6Au,
        0x5D1E0A9Eu, 0x650F6532u, 0x081E60E7u, 0x300F0F4Bu, 0x783CBFBFu, 0x402DD013u,
        0xE85BDE57u, 0xD04AB1FBu, 0x9879010Fu, 0xA0686EA3u,
    },
    {
        0x00000000u, 0xEF306B19u, 0xDB8CA0C3u, 0x34BCCBDAu, 0xB2F53777u, 0x5DC55C6Eu,
        0x697997B4u, 0x8649FCADu, 0x6006181Fu, 0x8F367306u, 0xBB8AB8DCu, 0x54BAD3C5u,
        0xD2F32F68u, 0x3DC34471u, 0x097F8FABu, 0xE64FE4B2u, 0xC00C303Eu, 0x2F3C5B27u,
        0x1B8090FDu, 0xF4B0FBE4u, 0x72F90749u, 0x9DC96C50u, 0xA975A78Au, 0x4645CC93u,
        0xA00A2821u, 0x4F3A4338u, 0x7B8688E2u, 0x94B6E3FBu, 0x12FF1F56u, 0xFDCF744Fu,
        0xC973BF95u, 0x2643D48Cu, 0x85F4168Du, 0x6AC47D94u, 0x5E78B64Eu, 0xB148DD57u,
        0x370121FAu, 0xD8314AE3u, 0xEC8D8139u, 0x03BDEA20u, 0xE5F20E92u, 0x0AC2658Bu,
        0x3E7EAE51u, 0xD14EC548u, 0x570739E5u, 0xB83752FCu, 0x8C8B9926u, 0x63BBF23Fu,
        0x45F826B3u, 0xAAC84DAAu, 0x9E748670u, 0x7144ED69u, 0xF70D11C4u, 0x183D7ADDu,
        0x2C81B107u, 0xC3B1DA1Eu, 0x25FE3EACu, 0xCACE55B5u, 0xFE729E6Fu, 0x1142F576u,
        0x970B09DBu, 0x783B62C2u, 0x4C87A918u, 0xA3B7C201u, 0x0E045BEBu, 0xE13430F2u,
        0xD588FB28u, 0x3AB89031u, 0xBCF16C9Cu, 0x53C10785u, 0x677DCC5Fu, 0x884DA746u,
        0x6E0243F4u, 0x813228EDu, 0xB58EE337u, 0x5ABE882Eu, 0xDCF77483u, 0x33C71F9Au,
        0x077BD440u, 0xE84BBF59u, 0xCE086BD5u, 0x213800CCu, 0x1584CB16u, 0xFAB4A00Fu,
        0x7CFD5CA2u, 0x93CD37BBu, 0xA771FC61u, 0x48419778u, 0xAE0E73CAu, 0x413E18D3u,
        0x7582D309u, 0x9AB2B810u, 0x1CFB44BDu, 0xF3CB2FA4u, 0xC777E47Eu, 0x28478F67u,
        0x8BF04D66u, 0x64C0267Fu, 0x507CEDA5u, 0xBF4C86BCu, 0x39057A11u, 0xD6351108u,
        0xE289DAD2u, 0x0DB9B1CBu, 0xEBF65579u, 0x04C63E60u, 0x307AF5BAu, 0xDF4A9EA3u,
        0x5903620Eu, 0xB6330917u, 0x828FC2CDu, 0x6DBFA9D4u, 0x4BFC7D58u, 0xA4CC1641u,
        0x9070DD9Bu, 0x7F40B682u, 0xF9094A2Fu, 0x16392136u, 0x2285EAECu, 0xCDB581F5u,
        0x2BFA6547u, 0xC4CA0E5Eu, 0xF076C584u, 0x1F46AE9Du, 0x990F5230u, 0x763F3929u,
        0x4283F2F3u, 0xADB399EAu, 0x1C08B7D6u, 0xF338DCCFu, 0xC7841715u, 0x28B47C0Cu,
        0xAEFD80A1u, 0x41CDEBB8u, 0x75712062u, 0x9A414B7Bu, 0x7C0EAFC9u, 0x933EC4D0u,
        0xA7820F0Au, 0x48B26413u, 0xCEFB98BEu, 0x21CBF3A7u, 0x1577387Du, 0xFA475364u,
        0xDC0487E8u, 0x3334ECF1u, 0x0788272Bu, 0xE8B84C32u, 0x6EF1B09Fu, 0x81C1DB86u,
        0xB57D105Cu, 0x5A4D7B45u, 0xBC029FF7u, 0x5332F4EEu, 0x678E3F34u, 0x88BE542Du,
        0x0EF7A880u, 0xE1C7C399u, 0xD57B0843u, 0x3A4B635Au, 0x99FCA15Bu, 0x76CCCA42u,
        0x42700198u, 0xAD406A81u, 0x2B09962Cu, 0xC439FD35u, 0xF08536EFu, 0x1FB55DF6u,
        0xF9FAB944u, 0x16CAD25Du, 0x22761987u, 0xCD46729Eu, 0x4B0F8E33u, 0xA43FE52Au,
        0x90832EF0u, 0x7FB345E9u, 0x59F09165u, 0xB6C0FA7Cu, 0x827C31A6u, 0x6D4C5ABFu,
        0xEB05A612u, 0x0435CD0Bu, 0x308906D1u, 0xDFB96DC8u, 0x39F6897Au, 0xD6C6E263u,
        0xE27A29B9u, 0x0D4A42A0u, 0x8B03BE0Du, 0x6433D514u, 0x508F1ECEu, 0xBFBF75D7u,
        0x120CEC3Du, 0xFD3C8724u, 0xC9804CFEu, 0x26B027E7u, 0xA0F9DB4Au, 0x4FC9B053u,
        0x7B757B89u, 0x94451090u, 0x720AF422u, 0x9D3A9F3Bu, 0xA98654E1u, 0x46B63FF8u,
        0xC0FFC355u, 0x2FCFA84Cu, 0x1B736396u, 0xF443088Fu, 0xD200DC03u, 0x3D30B71Au,
        0x098C7CC0u, 0xE6BC17D9u, 0x60F5EB74u, 0x8FC5806Du, 0xBB794BB7u, 0x544920AEu,
        0xB206C41Cu, 0x5D36AF05u, 0x698A64DFu, 0x86BA0FC6u, 0x00F3F36Bu, 0xEFC39872u,
        0xDB7F53A8u, 0x344F38B1u, 0x97F8FAB0u, 0x78C891A9u, 0x4C745A73u, 0xA344316Au,
        0x250DCDC7u, 0xCA3DA6DEu, 0xFE816D04u, 0x11B1061Du, 0xF7FEE2AFu, 0x18CE89B6u,
        0x2C72426Cu, 0xC3422975u, 0x450BD5D8u, 0xAA3BBEC1u, 0x9E87751Bu, 0x71B71E02u,
        0x57F4CA8Eu, 0xB8C4A197u, 0x8C786A4Du, 0x63480154u, 0xE501FDF9u, 0x0A3196E0u,
        0x3E8D5D3Au, 0xD1BD3623u, 0x37F2D291u, 0xD8C2B988u, 0xEC7E7252u, 0x034E194Bu,
        0x8507E5E6u, 0x6A378EFFu, 0x5E8B4525u, 0xB1BB2E3Cu,
    },
    {
        0x00000000u, 0x68032CC8u, 0xD0065990u, 0xB8057558u, 0xA5E0C5D1u, 0xCDE3E919u,
        0x75E69C41u, 0x1DE5B089u, 0x4E2DFD53u, 0x262ED19Bu, 0x9E2BA4C3u, 0xF628880Bu,
        0xEBCD3882u, 0x83CE144Au, 0x3BCB6112u, 0x53C84DDAu, 0x9C5BFAA6u, 0xF458D66Eu,
        0x4C5DA336u, 0x245E8FFEu, 0x39BB3F77u, 0x51B813BFu, 0xE9BD66E7u, 0x81BE4A2Fu,
        0xD27607F5u, 0xBA752B3Du, 0x02705E65u, 0x6A7372ADu, 0x7796C224u, 0x1F95EEECu,
        0xA7909BB4u, 0xCF93B77Cu, 0x3D5B83BDu, 0x5558AF75u, 0xED5DDA2Du, 0x855EF6E5u,
        0x98BB466Cu, 0xF0B86AA4u, 0x48BD1FFCu, 0x20BE3334u, 0x73767EEEu, 0x1B755226u,
        0xA370277Eu, 0xCB730BB6u, 0xD696BB3Fu, 0xBE9597F7u, 0x0690E2AFu, 0x6E93CE67u,
        0xA100791Bu, 0xC90355D3u, 0x7106208Bu, 0x19050C43u, 0x04E0BCCAu, 0x6CE39002u,
        0xD4E6E55Au, 0xBCE5C992u, 0xEF2D8448u, 0x872EA880u, 0x3F2BDDD8u, 0x5728F110u,
        0x4ACD4199u, 0x22CE6D51u, 0x9ACB1809u, 0xF2C834C1u, 0x7AB7077Au, 0x12B42BB2u,
        0xAAB15EEAu, 0xC2B27222u, 0xDF57C2ABu, 0xB754EE63u, 0x0F519B3Bu, 0x6752B7F3u,
        0x349AFA29u, 0x5C99D6E1u, 0xE49CA3B9u, 0x8C9F8F71u, 0x917A3FF8u, 0xF9791330u,
        0x417C6668u, 0x297F4AA0u, 0xE6ECFDDCu, 0x8EEFD114u, 0x36EAA44Cu, 0x5EE98884u,
        0x430C380Du, 0x2B0F14C5u, 0x930A619Du, 0xFB094D55u, 0xA8C1008Fu, 0xC0C22C47u,
        0x78C7591Fu, 0x10C475D7u, 0x0D21C55Eu, 0x6522E996u, 0xDD279CCEu, 0xB524B006u,
        0x47EC84C7u, 0x2FEFA80Fu, 0x97EADD57u, 0xFFE9F19Fu, 0xE20C4116u, 0x8A0F6DDEu,
        0x320A1886u, 0x5A09344Eu, 0x09C17994u, 0x61C2555Cu, 0xD9C72004u, 0xB1C40CCCu,
        0xAC21BC45u, 0xC422908Du, 0x7C27E5D5u, 0x1424C91Du, 0xDBB77E61u, 0xB3B452A9u,
        0x0BB127F1u, 0x63B20B39u, 0x7E57BBB0u, 0x16549778u, 0xAE51E220u, 0xC652CEE8u,
        0x959A8332u, 0xFD99AFFAu, 0x459CDAA2u, 0x2D9FF66Au, 0x307A46E3u, 0x58796A2Bu,
        0xE07C1F73u, 0x887F33BBu, 0xF56E0EF4u, 0x9D6D223Cu, 0x25685764u, 0x4D6B7BACu,
        0x508ECB25u, 0x388DE7EDu, 0x808892B5u, 0xE88BBE7Du, 0xBB43F3A7u, 0xD340DF6Fu,
        0x6B45AA37u, 0x034686FFu, 0x1EA33676u, 0x76A01ABEu, 0xCEA56FE6u, 0xA6A6432Eu,
        0x6935F452u, 0x0136D89Au, 0xB933ADC2u, 0xD130810Au, 0xCCD53183u, 0xA4D61D4Bu,
        0x1CD36813u, 0x74D044DBu, 0x27180901u, 0x4F1B25C9u, 0xF71E5091u, 0x9F1D7C59u,
        0x82F8CCD0u, 0xEAFBE018u, 0x52FE9540u, 0x3AFDB988u, 0xC8358D49u, 0xA036A181u,
        0x1833D4D9u, 0x7030F811u, 0x6DD54898u, 0x05D66450u, 0xBDD31108u, 0xD5D03DC0u,
        0x8618701Au, 0xEE1B5CD2u, 0x561E298Au, 0x3E1D0542u, 0x23F8B5CBu, 0x4BFB9903u,
        0xF3FEEC5Bu, 0x9BFDC093u, 0x546E77EFu, 0x3C6D5B27u, 0x84682E7Fu, 0xEC6B02B7u,
        0xF18EB23Eu, 0x998D9EF6u, 0x2188EBAEu, 0x498BC766u, 0x1A438ABCu, 0x7240A674u,
        0xCA45D32Cu, 0xA246FFE4u, 0xBFA34F6Du, 0xD7A063A5u, 0x6FA516FDu, 0x07A63A35u,
        0x8FD9098Eu, 0xE7DA2546u, 0x5FDF501Eu, 0x37DC7CD6u, 0x2A39CC5Fu, 0x423AE097u,
        0xFA3F95CFu, 0x923CB907u, 0xC1F4F4DDu, 0xA9F7D815u, 0x11F2AD4Du, 0x79F18185u,
        0x6414310Cu, 0x0C171DC4u, 0xB412689Cu, 0xDC114454u, 0x1382F328u, 0x7B81DFE0u,
        0xC384AAB8u, 0xAB878670u, 0xB66236F9u, 0xDE611A31u, 0x66646F69u, 0x0E6743A1u,
        0x5DAF0E7Bu, 0x35AC22B3u, 0x8DA957EBu, 0xE5AA7B23u, 0xF84FCBAAu, 0x904CE762u,
        0x2849923Au, 0x404ABEF2u, 0xB2828A33u, 0xDA81A6FBu, 0x6284D3A3u, 0x0A87FF6Bu,
        0x17624FE2u, 0x7F61632Au, 0xC7641672u, 0xAF673ABAu, 0xFCAF7760u, 0x94AC5BA8u,
        0x2CA92EF0u, 0x44AA0238u, 0x594FB2B1u, 0x314C9E79u, 0x8949EB21u, 0xE14AC7E9u,
        0x2ED97095u, 0x46DA5C5Du, 0xFEDF2905u, 0x96DC05CDu, 0x8B39B544u, 0xE33A998Cu,
        0x5B3FECD4u, 0x333CC01Cu, 0x60F48DC6u, 0x08F7A10Eu, 0xB0F2D456u, 0xD8F1F89Eu,
        0xC5144817u, 0xAD1764DFu, 0x15121187u, 0x7D113D4Fu,
    },
    {
        0x00000000u, 0x493C7D27u, 0x9278FA4Eu, 0xDB448769u, 0x211D826Du, 0x6821FF4Au,
        0xB3657823u, 0xFA590504u, 0x423B04DAu, 0x0B0779FDu, 0xD043FE94u, 0x997F83B3u,
        0x632686B7u, 0x2A1AFB90u, 0xF15E7CF9u, 0xB86201DEu, 0x847609B4u, 0xCD4A7493u,
        0x160EF3FAu, 0x5F328EDDu, 0xA56B8BD9u, 0xEC57F6FEu, 0x37137197u, 0x7E2F0CB0u,
        0xC64D0D6Eu, 0x8F717049u, 0x5435F720u, 0x1D098A07u, 0xE7508F03u, 0xAE6CF224u,
        0x7528754Du, 0x3C14086Au, 0x0D006599u, 0x443C18BEu, 0x9F789FD7u, 0xD644E2F0u,
        0x2C1DE7F4u, 0x65219AD3u, 0xBE651DBAu, 0xF759609Du, 0x4F3B6143u, 0x06071C64u,
        0xDD439B0Du, 0x947FE62Au, 0x6E26E32Eu, 0x271A9E09u, 0xFC5E1960u, 0xB5626447u,
        0x89766C2Du, 0xC04A110Au, 0x1B0E9663u, 0x5232EB44u, 0xA86BEE40u, 0xE1579367u,
        0x3A13140Eu, 0x732F6929u, 0xCB4D68F7u, 0x827115D0u, 0x593592B9u, 0x1009EF9Eu,
        0xEA50EA9Au, 0xA36C97BDu, 0x782810D4u, 0x31146DF3u, 0x1A00CB32u, 0x533CB615u,
        0x8878317Cu, 0xC1444C5Bu, 0x3B1D495Fu, 0x72213478u, 0xA965B311u, 0xE059CE36u,
        0x583BCFE8u, 0x1107B2CFu, 0xCA4335A6u, 0x837F4881u, 0x79264D85u, 0x301A30A2u,
        0xEB5EB7CBu, 0xA262CAECu, 0x9E76C286u, 0xD74ABFA1u, 0x0C0E38C8u, 0x453245EFu,
        0xBF6B40EBu, 0xF6573DCCu, 0x2D13BAA5u, 0x642FC782u, 0xDC4DC65Cu, 0x9571BB7Bu,
        0x4E353C12u, 0x07094135u, 0xFD504431u, 0xB46C3916u, 0x6F28BE7Fu, 0x2614C358u,
        0x1700AEABu, 0x5E3CD38Cu, 0x857854E5u, 0xCC4429C2u, 0x361D2CC6u, 0x7F2151E1u,
        0xA465D688u, 0xED59ABAFu, 0x553BAA71u, 0x1C07D756u, 0xC743503Fu, 0x8E7F2D18u,
        0x7426281Cu, 0x3D1A553Bu, 0xE65ED252u, 0xAF62AF75u, 0x9376A71Fu, 0xDA4ADA38u,
        0x010E5D51u, 0x48322076u, 0xB26B2572u, 0xFB575855u, 0x2013DF3Cu, 0x692FA21Bu,
        0xD14DA3C5u, 0x9871DEE2u, 0x4335598Bu, 0x0A0924ACu, 0xF05021A8u, 0xB96C5C8Fu,
        0x6228DBE6u, 0x2B14A6C1u, 0x34019664u, 0x7D3DEB43u, 0xA6796C2Au, 0xEF45110Du,
        0x151C1409u, 0x5C20692Eu, 0x8764EE47u, 0xCE589360u, 0x763A92BEu, 0x3F06EF99u,
        0xE44268F0u, 0xAD7E15D7u, 0x572710D3u, 0x1E1B6DF4u, 0xC55FEA9Du, 0x8C6397BAu,
        0xB0779FD0u, 0xF94BE2F7u, 0x220F659Eu, 0x6B3318B9u, 0x916A1DBDu, 0xD856609Au,
        0x0312E7F3u, 0x4A2E9AD4u, 0xF24C9B0Au, 0xBB70E62Du, 0x60346144u, 0x29081C63u,
        0xD3511967u, 0x9A6D6440u, 0x4129E329u, 0x08159E0Eu, 0x3901F3FDu, 0x703D8EDAu,
        0xAB7909B3u, 0xE2457494u, 0x181C7190u, 0x51200CB7u, 0x8A648BDEu, 0xC358F6F9u,
        0x7B3AF727u, 0x32068A00u, 0xE9420D69u, 0xA07E704Eu, 0x5A27754Au, 0x131B086Du,
        0xC85F8F04u, 0x8163F223u, 0xBD77FA49u, 0xF44B876Eu, 0x2F0F0007u, 0x66337D20u,
        0x9C6A7824u, 0xD5560503u, 0x0E12826Au, 0x472EFF4Du, 0xFF4CFE93u, 0xB67083B4u,
        0x6D3404DDu, 0x240879FAu, 0xDE517CFEu, 0x976D01D9u, 0x4C2986B0u, 0x0515FB97u,
        0x2E015D56u, 0x673D2071u, 0xBC79A718u, 0xF545DA3Fu, 0x0F1CDF3Bu, 0x4620A21Cu,
        0x9D642575u, 0xD4585852u, 0x6C3A598Cu, 0x250624ABu, 0xFE42A3C2u, 0xB77EDEE5u,
        0x4D27DBE1u, 0x041BA6C6u, 0xDF5F21AFu, 0x96635C88u, 0xAA7754E2u, 0xE34B29C5u,
        0x380FAEACu, 0x7133D38Bu, 0x8B6AD68Fu, 0xC256ABA8u, 0x19122CC1u, 0x502E51E6u,
        0xE84C5038u, 0xA1702D1Fu, 0x7A34AA76u, 0x3308D751u, 0xC951D255u, 0x806DAF72u,
        0x5B29281Bu, 0x1215553Cu, 0x230138CFu, 0x6A3D45E8u, 0xB179C281u, 0xF845BFA6u,
        0x021CBAA2u, 0x4B20C785u, 0x906440ECu, 0xD9583DCBu, 0x613A3C15u, 0x28064132u,
        0xF342C65Bu, 0xBA7EBB7Cu, 0x4027BE78u, 0x091BC35Fu, 0xD25F4436u, 0x9B633911u,
        0xA777317Bu, 0xEE4B4C5Cu, 0x350FCB35u, 0x7C33B612u, 0x866AB316u, 0xCF56CE31u,
        0x14124958u, 0x5D2E347Fu, 0xE54C35A1u, 0xAC704886u, 0x7734CFEFu, 0x3E08B2C8u,
        0xC451B7CCu, 0x8D6DCAEBu, 0x56294D82u, 0x1F1530A5u,
    },
};

static uint32_t crc32c_sw(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = crc32c_table[7][lo & 0xff] ^ crc32c_table[6][(lo >> 8) & 0xff] ^
            crc32c_table[5][(lo >> 16) & 0xff] ^ crc32c_table[4][lo >> 24] ^
            crc32c_table[3][hi & 0xff] ^ crc32c_table[2][(hi >> 8) & 0xff] ^
            crc32c_table[1][(hi >> 16) & 0xff] ^ crc32c_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

uint32_t fic_crc32c_ref(uint32_t crc, const uint8_t *buf, size_t n)
{
    if (buf == NULL)
        return crc;
    return ~crc32c_sw(~crc, buf, n);
}

/* ---- CRC32C: shifting a CRC over zero bytes, combining ----------------------------------
 * Polynomials mod P are 32-bit values in the reflected order of the CRC itself: bit 31 is x^0,
 * bit 0 is x^31. A CRC register r followed by n zero bytes becomes r * x^(8n) mod P, and
 * crc(A || B) = shift(crc(A), |B|) ^ crc(B), which is what lets independent streams be joined. */

/* x^(2^k) mod P for k = 0..31 (generated by squaring x; x^(2^31) wraps round to x). */
static const uint32_t crc32c_x2n[32] = {
    0x40000000u, 0x20000000u, 0x08000000u, 0x00800000u, 0x00008000u, 0x82F63B78u,
    0x6EA2D55Cu, 0x18B8EA18u, 0x510AC59Au, 0xB82BE955u, 0xB8FDB1E7u, 0x88E56F72u,
    0x74C360A4u, 0xE4172B16u, 0x0D65762Au, 0x35D73A62u, 0x28461564u, 0xBF455269u,
    0xE2EA32DCu, 0xFE7740E6u, 0xF946610Bu, 0x3C204F8Fu, 0x538586E3u, 0x59726915u,
    0x734D5309u, 0xBC1AC763u, 0x7D0722CCu, 0xD289CABEu, 0xE94CA9BCu, 0x05B74F3Fu,
    0xA51E1F42u, 0x40000000u,
};

/* a * b mod P, bit by bit (portable; for the combine and AArch64's block joins). */
static uint32_t crc32c_multmodp(uint32_t a, uint32_t b)
{
    uint32_t p = 0;
    for (uint32_t m = (uint32_t)1 << 31; m; m >>= 1) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        b = b & 1 ? (b >> 1) ^ 0x82F63B78u : b >> 1;
    }
    return p;
}

/* x^e mod P. */
static uint32_t crc32c_xpow(uint64_t e)
{
    uint32_t p = (uint32_t)1 << 31; /* 1 */
    for (unsigned k = 0; e; e >>= 1, k++)
        if (e & 1)
            p = crc32c_multmodp(crc32c_x2n[k & 31], p);
    return p;
}

/* The CRC register r after n more zero bytes (also right for finished, inverted CRCs in the
 * combine below: the inversions cancel). */
static uint32_t crc32c_shift(uint32_t r, uint64_t n)
{
    return crc32c_multmodp(crc32c_xpow(8 * n), r);
}

/* CRC32C of A || B from crc1 = CRC32C(A), crc2 = CRC32C(B) and len2 = |B| (zlib's
 * crc32_combine). Not used by the reader; tests/test_stream.py checks it, with crc32c_xpow and
 * the constants below, through a harness that includes this file. */
__attribute__((unused)) static uint32_t crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    return crc32c_shift(crc1, len2) ^ crc2;
}

#if defined(FIC_CRC_X86) && defined(__x86_64__)
/* Three interleaved crc32q streams over blocks of 3 x CRC_LONG, then 3 x CRC_SHORT bytes, joined
 * with a carry-less multiply: for a 32-bit register r and k = x^(8n-33) mod P, clmul(r, k) is
 * r * k * x as a reflected 64-bit value, and crc32q(0, v) is v * x^32 mod P, so together they give
 * r * x^(8n) mod P: r shifted over n zero bytes. */
#define FIC_CRC_3WAY 1
#define CRC_LONG 8192
#define CRC_SHORT 256
/* x^(8n-33) mod P for n = CRC_LONG, 2 CRC_LONG, CRC_SHORT, 2 CRC_SHORT (crc32c_xpow's values). */
static const uint32_t crc32c_k_long[2] = {0x54A86326u, 0x1DC403CCu};
static const uint32_t crc32c_k_short[2] = {0xB9E02B86u, 0xDD7E3B0Cu};

__attribute__((target("sse4.2,pclmul"))) static uint32_t crc32c_shift_clmul(uint32_t r, uint32_t k)
{
    __m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)r), _mm_cvtsi32_si128((int)k), 0);
    return (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(prod));
}

/* One block: three streams of len bytes at p, p + len, p + 2 len, joined into one register. */
__attribute__((target("sse4.2,pclmul"))) static inline uint64_t
crc32c_block3(uint64_t c0, const uint8_t *p, size_t len, const uint32_t k[2])
{
    uint64_t c1 = 0, c2 = 0;
    for (const uint8_t *end = p + len; p < end; p += 8) {
        uint64_t v0, v1, v2;
        memcpy(&v0, p, 8);
        memcpy(&v1, p + len, 8);
        memcpy(&v2, p + 2 * len, 8);
        c0 = _mm_crc32_u64(c0, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
    }
    return crc32c_shift_clmul((uint32_t)c0, k[1]) ^ crc32c_shift_clmul((uint32_t)c1, k[0]) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2,pclmul"))) static uint32_t crc32c_sse42_3way(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8(c, *p++);
        n--;
    }
    uint64_t c64 = c;
    for (; n >= 3 * CRC_LONG; p += 3 * CRC_LONG, n -= 3 * CRC_LONG)
        c64 = crc32c_block3(c64, p, CRC_LONG, crc32c_k_long);
    for (; n >= 3 * CRC_SHORT; p += 3 * CRC_SHORT, n -= 3 * CRC_SHORT)
        c64 = crc32c_block3(c64, p, CRC_SHORT, crc32c_k_short);
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
    }
    c = (uint32_t)c64;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
#endif

#if defined(FIC_CRC_X86)
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8(c, *p++);
        n--;
    }
#if defined(__x86_64__)
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
#endif
    while (n >= 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        c = _mm_crc32_u32(c, v);
        p += 4;
        n -= 4;
    }
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
#elif defined(FIC_CRC_ARM)
static uint32_t crc32c_arm(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = __crc32cb(c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __crc32cd(c, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __crc32cb(c, *p++);
    return c;
}

/* The same three streams on AArch64, joined with crc32c_multmodp (no carry-less multiply needed:
 * a few hundred cycles per block, small next to a block's 3 x 1024 or 3 x 128 crc32cx). The
 * lengths are powers of two, so x^(8n) mod P is an entry of crc32c_x2n. */
#define CRC_ARM_LONG 8192  /* x^(2^16), x^(2^17) */
#define CRC_ARM_SHORT 1024 /* x^(2^13), x^(2^14) */

static inline uint32_t crc32c_arm_block3(uint32_t c0, const uint8_t *p, size_t len, uint32_t k1, uint32_t k2)
{
    uint32_t c1 = 0, c2 = 0;
    for (const uint8_t *end = p + len; p < end; p += 8) {
        uint64_t v0, v1, v2;
        memcpy(&v0, p, 8);
        memcpy(&v1, p + len, 8);
        memcpy(&v2, p + 2 * len, 8);
        c0 = __crc32cd(c0, v0);
        c1 = __crc32cd(c1, v1);
        c2 = __crc32cd(c2, v2);
    }
    return crc32c_multmodp(k2, c0) ^ crc32c_multmodp(k1, c1) ^ c2;
}

static uint32_t crc32c_arm_3way(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = __crc32cb(c, *p++);
        n--;
    }
    for (; n >= 3 * CRC_ARM_LONG; p += 3 * CRC_ARM_LONG, n -= 3 * CRC_ARM_LONG)
        c = crc32c_arm_block3(c, p, CRC_ARM_LONG, crc32c_x2n[16], crc32c_x2n[17]);
    for (; n >= 3 * CRC_ARM_SHORT; p += 3 * CRC_ARM_SHORT, n -= 3 * CRC_ARM_SHORT)
        c = crc32c_arm_block3(c, p, CRC_ARM_SHORT, crc32c_x2n[13], crc32c_x2n[14]);
    return crc32c_arm(c, p, n);
}
#endif

uint32_t fic_crc32c(uint32_t crc, const uint8_t *buf, size_t n)
{
    if (buf == NULL)
        return crc;
#if defined(FIC_CRC_X86)
    __builtin_cpu_init();
#if defined(FIC_CRC_3WAY)
    if (n >= 3 * CRC_SHORT && __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul"))
        return ~crc32c_sse42_3way(~crc, buf, n);
#endif
    if (__builtin_cpu_supports("sse4.2"))
        return ~crc32c_sse42(~crc, buf, n);
#elif defined(FIC_CRC_ARM)
    return ~crc32c_arm_3way(~crc, buf, n);
#endif
    return ~crc32c_sw(~crc, buf, n);
}

/* ---- the reader -------------------------------------------------------------------------- */

#if FIC_HAVE_URING
typedef struct uring_slot {
    int64_t req;       /* index of the request this slot reads for, -1 when free */
    struct iovec iov;  /* for IORING_OP_READV on kernels without IORING_OP_READ */
    unsigned retries;  /* EAGAIN / EINTR in a row without progress */
} uring_slot;

typedef struct uring {
    int fd;
    int use_readv;
    int broken; /* io_uring_enter failed for good: SQEs may be stranded, never enter again */
    unsigned depth; /* most reads in flight at once */
    void *sq_map, *cq_map;
    size_t sq_map_size, cq_map_size;
    struct io_uring_sqe *sqes;
    size_t sqes_size;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    uring_slot *slots;
    unsigned *free_slots;
    unsigned n_free;
    int64_t *done; /* requests whose last read came back, waiting for req_finish */
} uring;
#endif

typedef struct pread_pool {
    int n_workers; /* threads besides the caller */
    int n_started;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    unsigned generation; /* bumped for every batch */
    int stop;
    int busy; /* workers that have not finished the current batch */
    fic_read_req *reqs;
    int64_t n_reqs;
    int64_t next; /* next request to take (atomic) */
} pread_pool;

/* Who owns the ring/pool: nobody, a submitted batch (running on the I/O thread, then finished
 * and waiting for fic_reader_wait), or a fic_reader_read running on its caller. */
enum { ASYNC_NONE = 0, ASYNC_RUNNING = 1, ASYNC_DONE = 2 };

/* The fault rules of a reader and what they did (see fic.h). The rules change only while no batch
 * runs (fic_reader_set_faults checks that under the reader's lock), so the I/O thread and the pread
 * workers read them without a lock; the counters are atomic. */
typedef struct fault_state {
    int on;                            /* any rule set: count operations */
    fic_faults cfg;
    uint64_t phase[FIC_FAULT_KINDS];
    int64_t ops;                       /* operations counted since the rules were set (atomic) */
    int64_t ops_total;                 /* ... since the open (atomic) */
    int64_t claims[FIC_FAULT_KINDS];   /* hits taken against each rule's count (atomic) */
    int64_t hits[FIC_FAULT_KINDS];     /* hits since the open (atomic) */
} fault_state;

struct fic_reader {
    int fd;
    int direct;
    int backend;
    int uring_errno; /* why not io_uring (fic_reader_uring_errno) */
    int64_t size;
    fault_state faults;
    /* Batch hand-over. mu guards everything below; async is also read without it (atomically)
     * by fic_reader_busy. */
    pthread_mutex_t mu;
    pthread_cond_t work_cv;  /* I/O thread: a batch was submitted, or stop */
    pthread_cond_t done_cv;  /* waiters: the submitted batch finished */
    pthread_cond_t idle_cv;  /* fic_reader_read callers: the ring/pool became free */
    pthread_t io_thread;
    int stop;
    int async;        /* ASYNC_* */
    int sync_running; /* a fic_reader_read is running its batch on its caller */
    fic_read_req *batch; /* the submitted batch, owned by the caller until fic_reader_wait */
    int64_t batch_n;
    int batch_status;
#if FIC_HAVE_URING
    uring ring;
#endif
    pread_pool pool;
};

/* Validation before any read: a bad request gets FIC_ERR_ARG and is skipped. */
static int req_prepare(const fic_reader *r, fic_read_req *q)
{
    q->n_read = 0;
    q->sys_errno = 0;
    q->status = FIC_OK;
    if (q->dst == NULL || q->length <= 0 || q->offset < 0 || q->offset > INT64_MAX - q->length)
        q->status = FIC_ERR_ARG;
    else if (r->direct && ((q->offset | q->length) % DIRECT_ALIGN || (uintptr_t)q->dst % DIRECT_ALIGN))
        q->status = FIC_ERR_ARG;
    return q->status == FIC_OK;
}

/* After a complete read: verify the CRC and, in buffered mode, drop the pages just read. */
static void req_finish(const fic_reader *r, fic_read_req *q)
{
    if (!r->direct && q->n_read > 0) {
        /* The kernel only drops folios lying wholly inside the range, and page cache folios are
         * up to 2 MiB (naturally aligned; a freshly written file is made of large ones). So round
         * out to 2 MiB: neighbours' pages go too, which is the point of buffered mode anyway. */
        int64_t start = q->offset & ~(FADV_WINDOW - 1);
        int64_t end = (q->offset + q->n_read + FADV_WINDOW - 1) & ~(FADV_WINDOW - 1);
        (void)posix_fadvise(r->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_DONTNEED);
    }
    if (q->status == FIC_OK && q->check_crc && fic_crc32c(0, (const uint8_t *)q->dst, (size_t)q->n_read) != q->crc32c)
        q->status = FIC_ERR_CRC;
}

/* A read of `got` bytes (> 0) came back. Returns 1 when the request needs another read. */
static int req_advance(const fic_reader *r, fic_read_req *q, int64_t got, int64_t asked)
{
    q->n_read += got;
    if (q->n_read >= q->length)
        return 0;
    /* Short: a legal partial read, or the end of the file. An O_DIRECT read that stops off the
     * alignment can only be the end of the file (and could not be continued anyway). */
    if (got < asked && r->direct && got % DIRECT_ALIGN) {
        q->status = FIC_ERR_SHORT;
        return 0;
    }
    return 1;
}

/* ---- fault injection (tests; see fic.h) ---- */

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static int faults_valid(const fic_faults *f)
{
    if (f->reserved != 0 || f->uring_setup_errno < 0)
        return 0;
    for (int k = 0; k < FIC_FAULT_KINDS; k++) {
        const fic_fault_rule *rule = &f->rules[k];
        if (rule->every < 0 || rule->count < 0 || rule->after < 0 || rule->arg < 0)
            return 0;
    }
    return 1;
}

/* Installs the rules (f valid, or NULL for none); the caller owns the reader (no batch runs). */
static void faults_set(fault_state *st, const fic_faults *f)
{
    memset(&st->cfg, 0, sizeof st->cfg);
    if (f != NULL)
        st->cfg = *f;
    st->on = 0;
    for (int k = 0; k < FIC_FAULT_KINDS; k++) {
        int64_t every = st->cfg.rules[k].every;
        st->on |= every > 0;
        st->phase[k] = every > 0 && st->cfg.seed != 0
                           ? splitmix64(st->cfg.seed ^ ((uint64_t)(k + 1) << 56)) % (uint64_t)every
                           : 0;
        __atomic_store_n(&st->claims[k], 0, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&st->ops, 0, __ATOMIC_RELAXED);
}

/* Whether rule k hits operation n, taking one of its `count` hits if so. */
static int fault_takes(fault_state *st, int k, int64_t n)
{
    const fic_fault_rule *rule = &st->cfg.rules[k];
    if (rule->every <= 0 || n <= rule->after || ((uint64_t)n + st->phase[k]) % (uint64_t)rule->every != 0)
        return 0;
    if (rule->count > 0 && __atomic_fetch_add(&st->claims[k], 1, __ATOMIC_RELAXED) >= rule->count)
        return 0;
    __atomic_fetch_add(&st->hits[k], 1, __ATOMIC_RELAXED);
    return 1;
}

/* One read operation came back with res (bytes >= 0, or -errno) after asking for `asked` bytes
 * into dst: what the faults make of it. An injected EIO scribbles over those bytes (a failed read
 * promises nothing about them), so that a caller who used them anyway would be caught. */
static int64_t fault_filter(fic_reader *r, int64_t res, int64_t asked, void *dst)
{
    fault_state *st = &r->faults;
    int64_t n = __atomic_add_fetch(&st->ops, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&st->ops_total, 1, __ATOMIC_RELAXED);
    if (fault_takes(st, FIC_FAULT_SLOW, n)) {
        int64_t us = st->cfg.rules[FIC_FAULT_SLOW].arg;
        struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
    if (fault_takes(st, FIC_FAULT_EIO, n)) {
        memset(dst, 0xE5, (size_t)asked);
        return -EIO;
    }
    if (fault_takes(st, FIC_FAULT_EAGAIN, n))
        return -EAGAIN;
    if (fault_takes(st, FIC_FAULT_EINTR, n))
        return -EINTR;
    if (res > 0) {
        /* Half of what was asked, in whole blocks under O_DIRECT, and less than what came. */
        int64_t unit = r->direct ? DIRECT_ALIGN : 1;
        int64_t cut = asked / 2 / unit * unit;
        if (cut > 0 && cut < res && fault_takes(st, FIC_FAULT_SHORT, n))
            return cut;
    }
    return res;
}

/* Before retrying an EAGAIN / EINTR: nothing the first few times, then a pause that doubles up to
 * about a millisecond (a device that says "again" is given time). */
static void retry_pause(unsigned retries)
{
    if (retries < 4)
        return;
    long us = 1L << (retries < 14 ? retries - 4 : 10);
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

static void pread_one(fic_reader *r, fic_read_req *q)
{
    unsigned retries = 0;
    for (;;) {
        int64_t want = q->length - q->n_read;
        ssize_t got = pread(r->fd, (uint8_t *)q->dst + q->n_read, (size_t)want, (off_t)(q->offset + q->n_read));
        if (r->faults.on) {
            int64_t res = fault_filter(r, got < 0 ? -(int64_t)errno : (int64_t)got, want, (uint8_t *)q->dst + q->n_read);
            got = (ssize_t)(res < 0 ? -1 : res);
            if (res < 0)
                errno = (int)-res;
        }
        if (got < 0) {
            if ((errno == EINTR || errno == EAGAIN) && ++retries <= MAX_RETRIES) {
                retry_pause(retries);
                continue;
            }
            q->status = FIC_ERR_IO;
            q->sys_errno = errno;
            break;
        }
        retries = 0;
        if (got == 0) {
            q->status = FIC_ERR_SHORT;
            break;
        }
        if (!req_advance(r, q, got, want))
            break;
    }
    req_finish(r, q);
}

/* ---- pread pool ---- */

static void pool_run(fic_reader *r)
{
    pread_pool *p = &r->pool;
    for (;;) {
        int64_t i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (i >= p->n_reqs)
            break;
        if (p->reqs[i].status == FIC_OK)
            pread_one(r, &p->reqs[i]);
    }
}

static void *pool_worker(void *arg)
{
    fic_reader *r = arg;
    pread_pool *p = &r->pool;
    unsigned seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen)
            pthread_cond_wait(&p->work_cv, &p->mu);
        if (p->stop)
            break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        pool_run(r);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0)
            pthread_cond_signal(&p->done_cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void pool_stop(pread_pool *p)
{
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_started; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    p->threads = NULL;
    p->n_started = 0;
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    pthread_mutex_destroy(&p->mu);
}

static int pool_start(fic_reader *r, int n_threads)
{
    pread_pool *p = &r->pool;
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    p->n_workers = n_threads - 1;
    if (p->n_workers == 0)
        return FIC_OK;
    p->threads = calloc((size_t)p->n_workers, sizeof *p->threads);
    if (p->threads == NULL) {
        pool_stop(p);
        return FIC_ERR_NOMEM;
    }
    for (int i = 0; i < p->n_workers; i++) {
        if (pthread_create(&p->threads[i], NULL, pool_worker, r) != 0) {
            pool_stop(p);
            return FIC_ERR_THREAD;
        }
        p->n_started++;
    }
    return FIC_OK;
}

static void pool_read(fic_reader *r, fic_read_req *reqs, int64_t n)
{
    pread_pool *p = &r->pool;
    p->reqs = reqs;
    p->n_reqs = n;
    __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
    if (p->n_workers > 0 && n > 1) {
        pthread_mutex_lock(&p->mu);
        p->busy = p->n_workers;
        p->generation++;
        pthread_cond_broadcast(&p->work_cv);
        pthread_mutex_unlock(&p->mu);
        pool_run(r);
        pthread_mutex_lock(&p->mu);
        while (p->busy > 0)
            pthread_cond_wait(&p->done_cv, &p->mu);
        pthread_mutex_unlock(&p->mu);
    } else {
        pool_run(r);
    }
}

/* ---- io_uring ---- */

#if FIC_HAVE_URING
static int sys_uring_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static void uring_close(uring *u)
{
    if (u->sqes != NULL && u->sqes != MAP_FAILED)
        munmap(u->sqes, u->sqes_size);
    if (u->cq_map != NULL && u->cq_map != MAP_FAILED && u->cq_map != u->sq_map)
        munmap(u->cq_map, u->cq_map_size);
    if (u->sq_map != NULL && u->sq_map != MAP_FAILED)
        munmap(u->sq_map, u->sq_map_size);
    if (u->fd >= 0)
        close(u->fd);
    free(u->slots);
    free(u->free_slots);
    free(u->done);
    memset(u, 0, sizeof *u);
    u->fd = -1;
}

/* IORING_OP_READ (5.6) if the kernel lists it, else READV. */
static int uring_has_op_read(int fd)
{
    size_t size = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, size);
    int ok = 0;
    if (probe == NULL)
        return 0;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PROBE, probe, 256) == 0)
        ok = probe->last_op >= IORING_OP_READ && (probe->ops[IORING_OP_READ].flags & IO_URING_OP_SUPPORTED);
    free(probe);
    return ok;
}

static int uring_open(uring *u, unsigned depth, int *err)
{
    struct io_uring_params p;
    memset(u, 0, sizeof *u);
    memset(&p, 0, sizeof p);
    u->fd = sys_uring_setup(depth, &p);
    if (u->fd < 0) {
        *err = errno;
        u->fd = -1;
        return FIC_ERR_UNSUPPORTED;
    }
    u->sq_map_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_map_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (u->cq_map_size > u->sq_map_size)
            u->sq_map_size = u->cq_map_size;
        u->cq_map_size = u->sq_map_size;
    }
    u->sq_map = mmap(NULL, u->sq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd,
                     IORING_OFF_SQ_RING);
    if (u->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        u->cq_map = u->sq_map;
    } else {
        u->cq_map = mmap(NULL, u->cq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd,
                         IORING_OFF_CQ_RING);
        if (u->cq_map == MAP_FAILED)
            goto fail;
    }
    u->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED)
        goto fail;
    u->sq_head = (unsigned *)((char *)u->sq_map + p.sq_off.head);
    u->sq_tail = (unsigned *)((char *)u->sq_map + p.sq_off.tail);
    u->sq_mask = (unsigned *)((char *)u->sq_map + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)((char *)u->sq_map + p.sq_off.array);
    u->cq_head = (unsigned *)((char *)u->cq_map + p.cq_off.head);
    u->cq_tail = (unsigned *)((char *)u->cq_map + p.cq_off.tail);
    u->cq_mask = (unsigned *)((char *)u->cq_map + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)((char *)u->cq_map + p.cq_off.cqes);
    /* Never more in flight than the SQ holds, nor than the CQ can take without overflow. */
    u->depth = depth < p.sq_entries ? depth : p.sq_entries;
    if (u->depth > p.cq_entries)
        u->depth = p.cq_entries;
    u->slots = calloc(u->depth, sizeof *u->slots);
    u->free_slots = calloc(u->depth, sizeof *u->free_slots);
    u->done = calloc(u->depth, sizeof *u->done);
    if (u->slots == NULL || u->free_slots == NULL || u->done == NULL) {
        uring_close(u);
        return FIC_ERR_NOMEM;
    }
    u->use_readv = !uring_has_op_read(u->fd);
    return FIC_OK;
fail:
    *err = errno;
    uring_close(u);
    return FIC_ERR_UNSUPPORTED;
}

/* Queue the next piece of request `qi` on slot s (the caller guarantees SQ room). */
static void uring_queue(fic_reader *r, unsigned s, int64_t qi, fic_read_req *q)
{
    uring *u = &r->ring;
    unsigned tail = *u->sq_tail; /* only we write it */
    unsigned idx = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[idx];
    int64_t want = q->length - q->n_read;
    if (want > MAX_CHUNK)
        want = MAX_CHUNK;
    u->slots[s].req = qi;
    memset(sqe, 0, sizeof *sqe);
    sqe->fd = r->fd;
    sqe->off = (uint64_t)(q->offset + q->n_read);
    if (u->use_readv) {
        u->slots[s].iov.iov_base = (uint8_t *)q->dst + q->n_read;
        u->slots[s].iov.iov_len = (size_t)want;
        sqe->opcode = IORING_OP_READV;
        sqe->addr = (uint64_t)(uintptr_t)&u->slots[s].iov;
        sqe->len = 1;
    } else {
        sqe->opcode = IORING_OP_READ;
        sqe->addr = (uint64_t)(uintptr_t)((uint8_t *)q->dst + q->n_read);
        sqe->len = (uint32_t)want;
    }
    sqe->user_data = s;
    u->sq_array[idx] = idx;
    /* Release: the kernel must see the SQE before the new tail. */
    __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

/* Handle one completion; returns 1 when the request needs another read, 0 when it is done (its
 * req_finish is left to the caller). */
static int uring_complete(fic_reader *r, fic_read_req *reqs, unsigned s, int res)
{
    uring_slot *slot = &r->ring.slots[s];
    fic_read_req *q = &reqs[slot->req];
    int64_t asked = q->length - q->n_read;
    if (asked > MAX_CHUNK)
        asked = MAX_CHUNK;
    if (r->faults.on)
        res = (int)fault_filter(r, res, asked, (uint8_t *)q->dst + q->n_read);
    if ((res == -EINTR || res == -EAGAIN) && ++slot->retries <= MAX_RETRIES) {
        retry_pause(slot->retries);
        return 1;
    }
    if (res < 0) {
        q->status = FIC_ERR_IO;
        q->sys_errno = -res;
    } else if (res == 0) {
        q->status = FIC_ERR_SHORT;
    } else {
        slot->retries = 0;
        if (req_advance(r, q, res, asked))
            return 1;
    }
    return 0;
}

/* Queue requests from *next into the free slots. */
static void uring_fill(fic_reader *r, fic_read_req *reqs, int64_t n, int64_t *next, unsigned *in_flight,
                       unsigned *to_submit)
{
    uring *u = &r->ring;
    while (u->n_free > 0 && *next < n) {
        if (reqs[*next].status == FIC_OK) {
            unsigned s = u->free_slots[--u->n_free];
            u->slots[s].retries = 0;
            uring_queue(r, s, *next, &reqs[*next]);
            (*in_flight)++;
            (*to_submit)++;
        }
        (*next)++;
    }
}

static int uring_read(fic_reader *r, fic_read_req *reqs, int64_t n)
{
    uring *u = &r->ring;
    int64_t next = 0;
    unsigned in_flight = 0, to_submit = 0;
    if (u->broken)
        return -EIO;
    u->n_free = u->depth;
    for (unsigned s = 0; s < u->depth; s++)
        u->free_slots[s] = u->depth - 1 - s;
    for (;;) {
        /* Keep the queue full. */
        uring_fill(r, reqs, n, &next, &in_flight, &to_submit);
        if (in_flight == 0)
            return FIC_OK;
        int ret = sys_uring_enter(u->fd, to_submit, 1, IORING_ENTER_GETEVENTS);
        if (ret < 0) {
            if (errno != EINTR && errno != EAGAIN && errno != EBUSY) {
                u->broken = 1;
                return -errno;
            }
            ret = 0; /* transient: reap what completed, then submit again */
        }
        to_submit -= (unsigned)ret < to_submit ? (unsigned)ret : to_submit;
        /* Reap every completion there is. Acquire: the CQE is visible before its tail. */
        unsigned head = *u->cq_head;
        unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        unsigned n_done = 0;
        while (head != tail) {
            struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
            unsigned s = (unsigned)cqe->user_data;
            int res = cqe->res;
            head++;
            /* Release the CQE to the kernel before queuing more (it is copied out above). */
            __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
            if (uring_complete(r, reqs, s, res)) {
                uring_queue(r, s, u->slots[s].req, &reqs[u->slots[s].req]);
                to_submit++;
            } else {
                u->done[n_done++] = u->slots[s].req;
                u->free_slots[u->n_free++] = s;
                in_flight--;
            }
        }
        if (n_done == 0)
            continue;
        /* Refill the queue and submit before the finished requests' CRC checks, so the disk works
         * while they run. A failed submit is left for the enter at the top of the loop to retry
         * or report: every request reaped here is finished before any return. */
        uring_fill(r, reqs, n, &next, &in_flight, &to_submit);
        if (to_submit > 0) {
            ret = sys_uring_enter(u->fd, to_submit, 0, 0);
            if (ret > 0)
                to_submit -= (unsigned)ret < to_submit ? (unsigned)ret : to_submit;
        }
        for (unsigned i = 0; i < n_done; i++)
            req_finish(r, &reqs[u->done[i]]);
    }
}
#endif /* FIC_HAVE_URING */

/* ---- one batch, on whichever thread owns the ring/pool ---- */

/* Validates and reads every request; returns FIC_OK or the first failing status. */
static int run_batch(fic_reader *r, fic_read_req *reqs, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        req_prepare(r, &reqs[i]);
#if FIC_HAVE_URING
    if (r->backend == FIC_IO_URING) {
        int ret = uring_read(r, reqs, n);
        if (ret < 0) {
            /* The ring itself failed (not one read): report it on every unfinished request. */
            for (int64_t i = 0; i < n; i++) {
                if (reqs[i].status == FIC_OK && reqs[i].n_read < reqs[i].length) {
                    reqs[i].status = FIC_ERR_IO;
                    reqs[i].sys_errno = -ret;
                }
            }
        }
    } else
#endif
    {
        pool_read(r, reqs, n);
    }
    for (int64_t i = 0; i < n; i++)
        if (reqs[i].status != FIC_OK)
            return reqs[i].status;
    return FIC_OK;
}

/* The reader's I/O thread: runs each submitted batch (reaping and refilling the io_uring queue,
 * or as one of the pread workers) and its CRC checks, then wakes fic_reader_wait. */
static void *io_main(void *arg)
{
    fic_reader *r = arg;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->stop && r->async != ASYNC_RUNNING)
            pthread_cond_wait(&r->work_cv, &r->mu);
        if (r->async != ASYNC_RUNNING) /* stop: close waited for any batch to finish first */
            break;
        fic_read_req *reqs = r->batch;
        int64_t n = r->batch_n;
        pthread_mutex_unlock(&r->mu);
        int status = run_batch(r, reqs, n);
        pthread_mutex_lock(&r->mu);
        r->batch_status = status;
        __atomic_store_n(&r->async, ASYNC_DONE, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&r->done_cv);
        pthread_cond_broadcast(&r->idle_cv);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static void backend_close(fic_reader *r)
{
#if FIC_HAVE_URING
    if (r->backend == FIC_IO_URING)
        uring_close(&r->ring);
    else
#endif
        pool_stop(&r->pool);
}

/* ---- public API ---- */

int fic_reader_open(const char *path, int backend, int queue_depth, int n_threads, int flags,
                    const fic_faults *faults, fic_reader **out, int *out_errno)
{
    int err_dummy = 0;
    if (out_errno == NULL)
        out_errno = &err_dummy;
    *out_errno = 0;
    if (out != NULL)
        *out = NULL;
    if (path == NULL || out == NULL || queue_depth < 1 || n_threads < 1 ||
        (backend != FIC_IO_AUTO && backend != FIC_IO_URING && backend != FIC_IO_PREAD) ||
        (flags & ~FIC_OPEN_NO_DIRECT) || (faults != NULL && !faults_valid(faults)))
        return FIC_ERR_ARG;
#if !FIC_HAVE_URING
    if (backend == FIC_IO_URING) {
        *out_errno = ENOSYS;
        return FIC_ERR_UNSUPPORTED;
    }
#endif
    if (queue_depth > MAX_QUEUE_DEPTH)
        queue_depth = MAX_QUEUE_DEPTH;
    if (n_threads > MAX_THREADS)
        n_threads = MAX_THREADS;

    fic_reader *r = calloc(1, sizeof *r);
    if (r == NULL)
        return FIC_ERR_NOMEM;
    r->fd = -1;
#if FIC_HAVE_URING
    r->ring.fd = -1;
#endif
    faults_set(&r->faults, faults);
    int fd = -1;
    if (!(flags & FIC_OPEN_NO_DIRECT)) {
        fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        r->direct = fd >= 0;
        if (fd < 0 && errno != EINVAL) { /* EINVAL: this filesystem refuses O_DIRECT */
            *out_errno = errno;
            free(r);
            return FIC_ERR_OPEN;
        }
    }
    if (fd < 0)
        fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *out_errno = errno;
        free(r);
        return FIC_ERR_OPEN;
    }
    r->fd = fd;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        *out_errno = errno;
        close(fd);
        free(r);
        return FIC_ERR_OPEN;
    }
    r->size = (int64_t)st.st_size;

    int status = FIC_ERR_UNSUPPORTED;
#if FIC_HAVE_URING
    if (backend != FIC_IO_PREAD) {
        int uerr = r->faults.cfg.uring_setup_errno;
        status = uerr != 0 ? FIC_ERR_UNSUPPORTED : uring_open(&r->ring, (unsigned)queue_depth, &uerr);
        if (status == FIC_OK) {
            r->backend = FIC_IO_URING;
        } else if (backend == FIC_IO_URING) {
            *out_errno = uerr;
            close(fd);
            free(r);
            return status;
        } else {
            r->uring_errno = uerr != 0 ? uerr : ENOMEM; /* uring_open gives no errno only when calloc failed */
        }
    }
#else
    if (backend != FIC_IO_PREAD)
        r->uring_errno = ENOSYS; /* built without io_uring */
#endif
    if (status != FIC_OK) {
        r->backend = FIC_IO_PREAD;
        status = pool_start(r, n_threads);
        if (status != FIC_OK) {
            close(fd);
            free(r);
            return status;
        }
    }
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->work_cv, NULL);
    pthread_cond_init(&r->done_cv, NULL);
    pthread_cond_init(&r->idle_cv, NULL);
    /* The I/O thread takes no signals (they are the application's business, and would only
     * interrupt its reads): it starts with every signal blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int created = pthread_create(&r->io_thread, NULL, io_main, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (created != 0) {
        pthread_cond_destroy(&r->idle_cv);
        pthread_cond_destroy(&r->done_cv);
        pthread_cond_destroy(&r->work_cv);
        pthread_mutex_destroy(&r->mu);
        backend_close(r);
        close(fd);
        free(r);
        return FIC_ERR_THREAD;
    }
    *out = r;
    return FIC_OK;
}

int fic_reader_read(fic_reader *r, fic_read_req *reqs, int64_t n_reqs)
{
    if (r == NULL || n_reqs < 0 || (reqs == NULL && n_reqs > 0))
        return FIC_ERR_ARG;
    /* Run on the caller (no thread hop) once the ring/pool is free: after other callers' reads
     * and after a submitted batch's I/O (which needs nobody to finish; its wait can come later). */
    pthread_mutex_lock(&r->mu);
    while (r->sync_running || r->async == ASYNC_RUNNING)
        pthread_cond_wait(&r->idle_cv, &r->mu);
    r->sync_running = 1;
    pthread_mutex_unlock(&r->mu);
    int status = run_batch(r, reqs, n_reqs);
    pthread_mutex_lock(&r->mu);
    r->sync_running = 0;
    pthread_cond_broadcast(&r->idle_cv);
    pthread_mutex_unlock(&r->mu);
    return status;
}

int fic_reader_submit(fic_reader *r, fic_read_req *reqs, int64_t n_reqs)
{
    if (r == NULL || n_reqs < 0 || (reqs == NULL && n_reqs > 0))
        return FIC_ERR_ARG;
    pthread_mutex_lock(&r->mu);
    /* One batch at a time: refused while a submitted batch is not yet collected by
     * fic_reader_wait, or while a fic_reader_read holds the ring/pool. */
    if (r->async != ASYNC_NONE || r->sync_running) {
        pthread_mutex_unlock(&r->mu);
        return FIC_ERR_ARG;
    }
    r->batch = reqs;
    r->batch_n = n_reqs;
    if (n_reqs == 0) {
        r->batch_status = FIC_OK;
        __atomic_store_n(&r->async, ASYNC_DONE, __ATOMIC_RELEASE);
    } else {
        __atomic_store_n(&r->async, ASYNC_RUNNING, __ATOMIC_RELEASE);
        pthread_cond_signal(&r->work_cv);
    }
    pthread_mutex_unlock(&r->mu);
    return FIC_OK;
}

int fic_reader_wait(fic_reader *r)
{
    if (r == NULL)
        return FIC_ERR_ARG;
    pthread_mutex_lock(&r->mu);
    while (r->async == ASYNC_RUNNING)
        pthread_cond_wait(&r->done_cv, &r->mu);
    int status = FIC_OK;
    if (r->async == ASYNC_DONE) {
        status = r->batch_status;
        r->batch = NULL;
        r->batch_n = 0;
        __atomic_store_n(&r->async, ASYNC_NONE, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&r->mu);
    return status;
}

int fic_reader_set_faults(fic_reader *r, const fic_faults *faults)
{
    if (r == NULL || (faults != NULL && !faults_valid(faults)))
        return FIC_ERR_ARG;
    pthread_mutex_lock(&r->mu);
    int idle = r->async == ASYNC_NONE && !r->sync_running;
    if (idle)
        faults_set(&r->faults, faults);
    pthread_mutex_unlock(&r->mu);
    return idle ? FIC_OK : FIC_ERR_ARG;
}

int64_t fic_reader_fault_hits(const fic_reader *r, int kind)
{
    if (r == NULL || kind < 0 || kind > FIC_FAULT_KINDS)
        return FIC_ERR_ARG;
    if (kind == FIC_FAULT_KINDS)
        return __atomic_load_n(&r->faults.ops_total, __ATOMIC_RELAXED);
    return __atomic_load_n(&r->faults.hits[kind], __ATOMIC_RELAXED);
}

int fic_reader_uring_errno(const fic_reader *r) { return r == NULL ? FIC_ERR_ARG : r->uring_errno; }

int fic_reader_busy(const fic_reader *r)
{
    return r != NULL && __atomic_load_n(&r->async, __ATOMIC_ACQUIRE) == ASYNC_RUNNING;
}

int fic_reader_backend(const fic_reader *r) { return r == NULL ? FIC_ERR_ARG : r->backend; }

int fic_reader_direct(const fic_reader *r) { return r != NULL && r->direct; }

int64_t fic_reader_size(const fic_reader *r) { return r == NULL ? FIC_ERR_ARG : r->size; }

void fic_reader_close(fic_reader *r)
{
    if (r == NULL)
        return;
    /* A submitted batch still writes into its requests and destinations: let it finish (its
     * results stay in the requests; nobody needs to wait for them), then stop the I/O thread. */
    pthread_mutex_lock(&r->mu);
    while (r->async == ASYNC_RUNNING || r->sync_running)
        pthread_cond_wait(&r->idle_cv, &r->mu);
    r->stop = 1;
    pthread_cond_signal(&r->work_cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->io_thread, NULL);
    pthread_cond_destroy(&r->idle_cv);
    pthread_cond_destroy(&r->done_cv);
    pthread_cond_destroy(&r->work_cv);
    pthread_mutex_destroy(&r->mu);
    backend_close(r);
    close(r->fd);
    free(r);
}
