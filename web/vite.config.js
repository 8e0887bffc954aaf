import { defineConfig } from 'vite';

// The PowerSync web SDK ships web workers and WASM (wa-sqlite): keep them out of
// dependency pre-bundling and build workers as ES modules.
export default defineConfig({
  base: './',
  optimizeDeps: { exclude: ['@journeyapps/wa-sqlite', '@powersync/web'] },
  worker: { format: 'es' },
  build: { outDir: 'dist', emptyOutDir: true, sourcemap: false, reportCompressedSize: false },
});
