// llvm-mca region markers (make bench-neon, tests/bench_neon.py): in a build with DLLAMA_MCA
// defined they put "# LLVM-MCA-BEGIN/END <prefix><n>" comments into the assembly around one
// iteration of a hot loop, so llvm-mca reads exactly the steady-state body; in every other build
// they are nothing. They are asm volatile statements, so a marked build is for reading only:
// the compiler keeps them in place, which may move a few instructions across an iteration's edge.
#pragma once

#ifdef DLLAMA_MCA
#define DLLAMA_MCA_BEGIN(prefix, n) asm volatile("# LLVM-MCA-BEGIN " prefix "%c0" ::"i"(n))
#define DLLAMA_MCA_END(prefix, n) asm volatile("# LLVM-MCA-END " prefix "%c0" ::"i"(n))
#else
#define DLLAMA_MCA_BEGIN(prefix, n) ((void)0)
#define DLLAMA_MCA_END(prefix, n) ((void)0)
#endif
