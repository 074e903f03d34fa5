"""Method A: a DINOv3 student, initialised from its frozen teacher, reads the noised pixels (plus a time token);
its patch tokens are aligned with the teacher's of the clean image while it trains."""

from pixelgen.families.base import FlowFamily, trunk_trains_anywhere
from pixelgen.models.teachers import TEACHERS


class DinoStudent(FlowFamily):
    kind = "dino_student"
    plot_keys = (*FlowFamily.plot_keys, "student_loss")

    def check(self, model_cfg, trunk, dec, fail):
        teacher, p = trunk.student.teacher, trunk.patch_size
        if teacher.name not in TEACHERS or TEACHERS[teacher.name].patch_size != p:
            fail("trunk.student.teacher.name", teacher.name,
                 f"the student needs a /{p} DINO encoder; with patch 16 use vit_small_patch16_dinov3")
        if trunk.student.lora_rank < 0:
            fail("trunk.student.lora_rank", trunk.student.lora_rank, "must be >= 0 (0 = full fine-tuning)")
        super().check(model_cfg, trunk, dec, fail)

    def teachers(self, cfg):
        own = [("model.trunk.student.teacher", cfg.model.trunk.student.teacher)]  # the student starts from it
        return super().teachers(cfg) + (own if trunk_trains_anywhere(cfg) else [])

    def alignment_terms(self, model_cfg):
        student = model_cfg.trunk.student
        own = [("student_loss", "student", student.align_weight, student.teacher, "model.trunk.student.teacher")]
        return super().alignment_terms(model_cfg) + (own if student.align_weight > 0 else [])

    def trunk(self, model_cfg, trunk, *, pretrained):
        from pixelgen.models.student import DinoStudentTrunk  # imports timm

        return DinoStudentTrunk(student=trunk.student, pretrained=pretrained, dim=trunk.dim, depth=trunk.depth,
                                heads=trunk.heads, mlp_ratio=trunk.mlp_ratio, num_classes=model_cfg.num_classes,
                                activation_checkpointing=trunk.activation_checkpointing)


FAMILY = DinoStudent()
