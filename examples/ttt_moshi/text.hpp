#pragma once
// The text stream of a conversation, printed live: each text token's SentencePiece piece,
// "▁" as a space, padding tokens skipped (as Kyutai's server sends them).
#include <cstdio>
#include <memory>
#include <string>

#include "common.hpp"
#if TTT_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace ttt_moshi {

struct TextPrinter {
#if TTT_HAVE_SENTENCEPIECE
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;
#endif
  int64_t pad = 3, epad = 0;
  bool enabled = false;
  bool ids = false;  // without a tokenizer, print token ids (converse on random weights)

  void open(const std::string& path, const LmConfig& cfg) {
#if TTT_HAVE_SENTENCEPIECE
    sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
    auto st = sp->Load(path);
    if (!st.ok()) fail(path, ": cannot load SentencePiece model (", st.ToString(), ")");
    pad = cfg.existing_text_padding_id;
    epad = cfg.existing_text_end_padding_id;
    enabled = true;
#else
    (void)cfg;
    fail("--tokenizer: this build has no SentencePiece support (install libsentencepiece-dev and rebuild)");
#endif
  }
  // Prints the piece of `tok` (PAD and EPAD are silence, as in Kyutai's server).
  void print(int64_t tok) {
    if (!enabled && ids) {
      if (tok != pad && tok != epad && tok >= 0) std::printf("<%lld>", (long long)tok), std::fflush(stdout);
      return;
    }
#if TTT_HAVE_SENTENCEPIECE
    if (!enabled || tok == pad || tok == epad || tok < 0 || tok >= sp->GetPieceSize()) return;
    std::string piece = sp->IdToPiece(int(tok));
    // U+2581 marks a word start.
    for (size_t p; (p = piece.find("\xe2\x96\x81")) != std::string::npos;) piece.replace(p, 3, " ");
    std::fputs(piece.c_str(), stdout);
    std::fflush(stdout);
#else
    (void)tok;
#endif
  }
};

}  // namespace ttt_moshi
