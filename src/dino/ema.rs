//! The teacher's exponential moving average of the student (DINO `main_dino.py`):
//! `teacher = teacher * m + student * (1 - m)` over every parameter, `weight_g` included.

use candle_core::Result;

use crate::dino::inplace;
use crate::model::ops::cpu::affine;
use crate::model::params::Params;

/// Move every teacher tensor towards the student tensor of the same name with momentum `m`.
pub fn ema_update(teacher: &Params, student: &Params, m: f64) -> Result<()> {
    for (name, t) in teacher.iter() {
        let Some(s) = student.get(name) else {
            candle_core::bail!("EMA: teacher tensor `{name}` has no student counterpart");
        };
        // Like torch: t * f32(m) + s * f32(1 - m), 1 - m taken in f64.
        if inplace::applies(&[t.as_tensor(), s.as_tensor()]) {
            inplace::update_with(t.as_tensor(), s.as_tensor(), |t, s| {
                affine(t, m, 0.0) + affine(s, 1.0 - m, 0.0)
            })?;
            continue;
        }
        let updated = (t.as_tensor().affine(m, 0.0)? + s.as_tensor().affine(1.0 - m, 0.0)?)?;
        t.set(&updated)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use candle_nn::Init;

    #[test]
    fn the_teacher_moves_towards_the_student_by_one_minus_m() {
        let build = |vb: candle_nn::VarBuilder| vb.get_with_hints(3, "w", Init::Const(0.0));
        let (_, teacher) = Params::build(0, &Device::Cpu, build).unwrap();
        let (_, student) = Params::build(0, &Device::Cpu, build).unwrap();
        student.get("w").unwrap().set(&Tensor::new(&[1.0f32, 2.0, -4.0], &Device::Cpu).unwrap()).unwrap();
        ema_update(&teacher, &student, 0.75).unwrap();
        assert_eq!(teacher.get("w").unwrap().to_vec1::<f32>().unwrap(), [0.25, 0.5, -1.0]);
    }
}
